# Building ROS 2 interfaces against the ROS 2 wheels from the package index (the venv set-up, and
# the tests' builds of other interface packages): the wheels' exported CMake targets carry include
# directories of the wheel build container (/opt/python/<tag>/include/python3.X and a numpy
# include dir below it), which do not exist here and make the generate step fail. This replaces
# them with the building interpreter's own directories. A ROS install never has such paths, so
# there it changes nothing.
#
# mail_ros's CMakeLists.txt includes this file; any other package gets the same fix, unedited,
# with -DCMAKE_PROJECT_INCLUDE=<this file>. Either way the fix runs deferred, at the end of the
# top-level directory, when every find_package has imported its targets.
if(CMAKE_VERSION VERSION_LESS 3.19)
  return()  # no cmake_language(DEFER); such a CMake comes with a ROS install, which needs no fix
endif()

function(mail_ros_fix_wheel_include_dirs)
  get_property(_imported_targets DIRECTORY "${CMAKE_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
  set(_broken "")
  foreach(_target IN LISTS _imported_targets)
    get_target_property(_includes ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(_includes AND _includes MATCHES "(^|;)/opt/python/")
      list(APPEND _broken ${_target})
    endif()
  endforeach()
  if(NOT _broken)
    return()
  endif()
  if(NOT Python3_EXECUTABLE)
    find_package(Python3 REQUIRED COMPONENTS Interpreter)
  endif()
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import sysconfig, numpy; print(sysconfig.get_paths()['include'] + ';' + numpy.get_include())"
    OUTPUT_VARIABLE _local_includes
    OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _result)
  if(NOT _result EQUAL 0)
    message(FATAL_ERROR "cannot ask ${Python3_EXECUTABLE} for its include directories (Python.h, numpy); "
                        "needed to replace the ROS wheels' /opt/python include directories")
  endif()
  list(GET _local_includes 0 _local_python_include)
  list(GET _local_includes 1 _local_numpy_include)
  foreach(_target IN LISTS _broken)
    get_target_property(_includes ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    set(_fixed "")
    foreach(_dir IN LISTS _includes)
      if(_dir MATCHES "^/opt/python/.*/numpy/")
        list(APPEND _fixed "${_local_numpy_include}")
      elseif(_dir MATCHES "^/opt/python/")
        list(APPEND _fixed "${_local_python_include}")
      else()
        list(APPEND _fixed "${_dir}")
      endif()
    endforeach()
    list(REMOVE_DUPLICATES _fixed)
    set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_fixed}")
  endforeach()
  message(STATUS "replaced the ROS wheels' /opt/python include dirs of: ${_broken}")
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL mail_ros_fix_wheel_include_dirs)
