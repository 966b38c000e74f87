#!/usr/bin/env bash
# Create or update .venv: pinned dependencies (torch first), ROS 2 wheels, msg/ built with CMake
# into the venv, mail_ros installed editable. Idempotent: when nothing that affects the
# environment changed since the last successful run, it only checks the stamp and returns.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.mail_ros-setup-stamp"
PYTHON="${PYTHON:-python3.11}"

die() { echo "setup: $*" >&2; exit 1; }

# The inputs whose change requires re-running the set-up.
inputs_hash() {
  cat "$ROOT/requirements/requirements.txt" "$ROOT/requirements/constraints.txt" \
      "$ROOT/CMakeLists.txt" "$ROOT"/cmake/*.cmake "$ROOT/package.xml" "$ROOT/setup.py" "$ROOT"/msg/*.msg "$ROOT"/srv/*.srv \
      "$ROOT/scripts/setup_venv.sh" | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(inputs_hash)" && -x "$VENV/bin/python" ]]; then
  exit 0
fi

# System tools first, so a missing one is a sentence, not a stack trace halfway through.
command -v "$PYTHON" >/dev/null 2>&1 \
  || die "$PYTHON not found. Install Python 3.11 (Debian/Ubuntu: 'apt-get install python3.11 python3.11-venv python3.11-dev'), or set PYTHON=/path/to/python3.11."
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$pyver" == "3.11" ]] || die "$PYTHON is Python $pyver; mail_ros's pinned environment needs Python 3.11 (set PYTHON=/path/to/python3.11)."
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
  || die "$PYTHON cannot create virtual environments. Install the venv module (Debian/Ubuntu: 'apt-get install python3.11-venv')."
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
  || die "Python headers (Python.h) not found for $PYTHON; the message build needs them. Install them (Debian/Ubuntu: 'apt-get install python3.11-dev')."
command -v cmake >/dev/null 2>&1 || die "cmake not found; the message build needs CMake >= 3.16 (Debian/Ubuntu: 'apt-get install cmake')."
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
  || die "no C compiler found; the message build needs one (Debian/Ubuntu: 'apt-get install build-essential')."
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
  || die "no C++ compiler found; the message build needs one (Debian/Ubuntu: 'apt-get install build-essential')."

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# torch first and alone: the CPU wheel of exactly this version. Anything resolving torch later
# then sees it satisfied instead of pulling a CUDA build.
echo "setup: installing torch==2.13.0"
"${PIP[@]}" install -q "torch==2.13.0"
echo "setup: installing pinned dependencies"
"${PIP[@]}" install -q -r "$ROOT/requirements/requirements.txt" -c "$ROOT/requirements/constraints.txt"

echo "setup: building msg/ into the venv"
BUILD="$ROOT/build/venv-msgs"
mkdir -p "$ROOT/build"
export AMENT_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -Wno-dev \
  -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DPython3_EXECUTABLE="$VENV/bin/python" -DMAIL_ROS_INSTALL_PYTHON=OFF -DBUILD_TESTING=OFF \
  >"$BUILD.log" 2>&1 || { tail -30 "$BUILD.log" >&2; die "configuring the message build failed (full log: $BUILD.log)"; }
cmake --build "$BUILD" >>"$BUILD.log" 2>&1 || { tail -30 "$BUILD.log" >&2; die "building the messages failed (full log: $BUILD.log)"; }
cmake --install "$BUILD" >>"$BUILD.log" 2>&1 || { tail -30 "$BUILD.log" >&2; die "installing the messages failed (full log: $BUILD.log)"; }

# rosidl installs the generated message code as site-packages/mail_ros/{msg,*.so} with an empty
# __init__.py. That empty file would shadow this source tree's mail_ros package; without it the
# folder is a plain portion that mail_ros/__init__.py adds to its __path__ (pkgutil.extend_path).
# It also registers an egg-info for a "mail_ros" distribution; pip would take that for an older
# install of this package and uninstall it (deleting the message code) before the editable one.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$SITE/mail_ros/__init__.py"
rm -rf "$SITE"/mail_ros-*.egg-info

echo "setup: installing mail_ros (editable)"
# "compat" puts the source tree on sys.path (a .pth entry) so the regular package there is found
# alongside the message portion; the default finder-based editable install would lose to it.
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT" --config-settings editable_mode=compat

(cd / && "$VENV/bin/python" -c "import rclpy, torch, mail_ros.spec; from mail_ros.msg import ActionChunk") \
  || die "the environment was built but does not import; see the errors above"
inputs_hash >"$STAMP"
echo "setup: done ($VENV)"
