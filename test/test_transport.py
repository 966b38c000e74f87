"""The Fast DDS profile variable per distro, and the shipped profile itself."""

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mail_ros.transport import FASTDDS_VARIABLE, FASTRTPS_VARIABLE, fastdds_profile_environment

PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds_shm.xml"


@pytest.mark.parametrize("distro, variable", [("humble", FASTRTPS_VARIABLE), ("jazzy", FASTRTPS_VARIABLE),
                                              ("Jazzy ", FASTRTPS_VARIABLE), ("kilted", FASTDDS_VARIABLE),
                                              ("rolling", FASTDDS_VARIABLE), ("", FASTDDS_VARIABLE)])
def test_each_distro_gets_the_variable_its_fast_dds_reads(distro, variable):
    assert fastdds_profile_environment("/p.xml", {"ROS_DISTRO": distro}) == {variable: "/p.xml"}


@pytest.mark.parametrize("environ", [{FASTDDS_VARIABLE: "/mine.xml"}, {FASTRTPS_VARIABLE: "/mine.xml",
                                                                        "ROS_DISTRO": "humble"}])
def test_a_users_own_profile_wins_and_an_empty_profile_sets_nothing(environ):
    assert fastdds_profile_environment("/p.xml", environ) == {}
    assert fastdds_profile_environment("", {"ROS_DISTRO": "jazzy"}) == {}


def test_shipped_profile_is_a_default_participant_with_a_large_shm_segment_and_udp():
    ns = {"f": "http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles"}
    root = ET.parse(PROFILE).getroot()
    descriptors = {d.find("f:transport_id", ns).text: d for d in root.iterfind(".//f:transport_descriptor", ns)}
    participant = root.find(".//f:participant", ns)
    assert participant.get("is_default_profile") == "true"
    used = [t.text for t in participant.iterfind("f:rtps/f:userTransports/f:transport_id", ns)]
    assert sorted(descriptors[t].find("f:type", ns).text for t in used) == ["SHM", "UDPv4"]
    shm = next(descriptors[t] for t in used if descriptors[t].find("f:type", ns).text == "SHM")
    # Several 640x480 rgb8 frames (900 KiB each) in flight; Fast DDS's default is 512 KiB.
    assert int(shm.find("f:segment_size", ns).text) >= 8 * 640 * 480 * 3
    assert participant.find("f:rtps/f:useBuiltinTransports", ns).text == "false"
