"""NMEA parsing and epoch assembly, mostly with sentences captured from real receivers.

The literal sentences below are published captures (u-blox M8 protocol
description, SiRF reference manual, the classic NMEA examples) with their
original checksums, so a misconception shared by the parser and the
simulator cannot hide here.
"""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from gateway.gnss.fix import Fix
from gateway.gnss.nmea import NmeaParser
from tests.gnss_helpers import LOGGER, make_parser, nmea

UBX_GGA = b"$GPGGA,092725.00,4717.11399,N,00833.91590,E,1,08,1.01,499.6,M,48.0,M,,*5B\r\n"
UBX_RMC = b"$GPRMC,083559.00,A,4717.11437,N,00833.91522,E,0.004,77.52,091202,,,A*57\r\n"
UBX_VTG = b"$GPVTG,77.52,T,,M,0.004,N,0.008,K,A*06\r\n"
UBX_GSA = b"$GPGSA,A,3,23,29,07,08,09,18,26,28,,,,,1.94,1.18,1.54*0D\r\n"
UBX_GNS = b"$GNGNS,103600.01,5114.51176,N,00012.29380,W,ANNN,07,1.18,111.5,45.6,,,V*00\r\n"
UBX_GLL = b"$GPGLL,4717.11364,N,00833.91565,E,092321.00,A,A*60\r\n"
UBX_GSV = b"$GPGSV,3,1,10,23,38,230,44,29,71,156,47,07,29,116,41,08,09,081,36*7F\r\n"
UBX_ZDA = b"$GPZDA,082710.00,16,09,2002,00,00*64\r\n"
UBX_TXT = b"$GPTXT,01,01,02,u-blox ag - www.u-blox.com*50\r\n"
UBX_NOFIX = [b"$GPRMC,,V,,,,,,,,,,N*53", b"$GPVTG,,,,,,,,,N*30",
             b"$GPGGA,,,,,,0,00,99.99,,,,,,*48",
             b"$GPGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99*30", b"$GPGLL,,,,,,V,N*64"]
CLASSIC = [b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47",
           b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"]
SIRF = [b"$GPGGA,161229.487,3723.2475,N,12158.3416,W,1,07,1.0,9.0,M,,,,0000*18",
        b"$GPGSA,A,3,07,02,26,27,09,04,15,,,,,,1.8,1.0,1.5*33",
        b"$GPRMC,161229.487,A,3723.2475,N,12158.3416,W,0.13,309.62,120598,,*10",
        b"$GPVTG,309.62,T,,M,0.13,N,0.2,K*6E"]


def epoch(parser: NmeaParser, lines: list[bytes], received: float = 10.0) -> Fix:
    """Feed one epoch's lines and flush it; the fix must come out of the flush."""
    for k, line in enumerate(lines):
        assert parser.feed(line, received + k * 0.01) is None
    fix = parser.flush(received + 1.0)
    assert fix is not None
    return fix


def utc(year: int, month: int, day: int, hour: int, minute: int, second: int) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()


def test_ublox_gga_alone() -> None:
    parser, counters = make_parser()
    fix = epoch(parser, [UBX_GGA])
    assert fix.lat == pytest.approx(47 + 17.11399 / 60)
    assert fix.lon == pytest.approx(8 + 33.91590 / 60)
    assert (fix.alt, fix.satellites, fix.hdop) == (499.6, 8, 1.01)
    assert fix.fix_type == "THREE_D"  # altitude known, no GSA
    assert fix.utc is None  # no date seen yet
    assert fix.received == 10.0
    assert counters.snapshot("gnss.") == {"gnss.fixes": 1, "gnss.sentences": 1}


def test_ublox_rmc_vtg_gsa() -> None:
    parser, _ = make_parser()
    fix = epoch(parser, [UBX_RMC, UBX_VTG, UBX_GSA])
    assert fix.utc == utc(2002, 12, 9, 8, 35, 59)
    assert fix.lat == pytest.approx(47 + 17.11437 / 60)
    assert fix.speed_kmh == pytest.approx(0.008)  # VTG km/h preferred to RMC knots
    assert fix.heading == 77.52
    assert fix.fix_type == "THREE_D"  # GSA navMode 3
    assert (fix.satellites, fix.hdop) == (8, 1.18)  # GSA: eight used, its HDOP
    assert fix.received == pytest.approx(10.02)  # the epoch's last line


def test_classic_epoch_combines_gga_and_rmc() -> None:
    parser, counters = make_parser()
    fix = epoch(parser, CLASSIC)
    assert fix.as_dict() == {
        "lat": 48.1173, "lon": 11.5166667, "alt": 545.4, "speed": 41.48, "heading": 84.4,
        "fix": "THREE_D", "satellites": 8, "hdop": 0.9, "accuracy": 4.5,
        "utc": utc(1994, 3, 23, 12, 35, 19), "ts": 10.01}
    assert counters.get("gnss.fixes") == 1


def test_sirf_epoch_west_and_fractional_time() -> None:
    parser, _ = make_parser()
    fix = epoch(parser, SIRF)
    assert fix.lat == pytest.approx(37 + 23.2475 / 60)
    assert fix.lon == pytest.approx(-(121 + 58.3416 / 60))
    assert fix.utc == pytest.approx(utc(1998, 5, 12, 16, 12, 29) + 0.487)
    assert fix.speed_kmh == pytest.approx(0.2)
    assert fix.heading == 309.62
    assert (fix.satellites, fix.hdop, fix.fix_type) == (7, 1.0, "THREE_D")


def test_gns_with_a_checksum_of_zero_is_valid_and_a_wrong_one_is_not() -> None:
    parser, counters = make_parser()
    fix = epoch(parser, [UBX_GNS])  # its XOR really is 0x00
    assert fix.lat == pytest.approx(51 + 14.51176 / 60)
    assert fix.lon == pytest.approx(-(12.29380 / 60))
    assert (fix.alt, fix.satellites, fix.hdop, fix.fix_type) == (111.5, 7, 1.18, "THREE_D")
    assert parser.feed(UBX_GNS.replace(b"*00", b"*01"), 11.0) is None
    assert parser.flush(12.0) is None
    assert counters.get("gnss.errors.checksum") == 1


def test_no_fix_epoch_from_a_receiver() -> None:
    parser, counters = make_parser()
    fix = epoch(parser, UBX_NOFIX)
    assert fix.fix_type == "NONE" and not fix.valid
    assert (fix.lat, fix.lon, fix.alt, fix.speed_kmh, fix.heading, fix.hdop) == (None,) * 6
    assert fix.satellites == 0
    assert counters.snapshot("gnss.") == {"gnss.fixes": 1, "gnss.ignored": 1,
                                          "gnss.sentences": 4}


def test_fix_lost_and_regained_keeps_emitting() -> None:
    parser, _ = make_parser()
    good = nmea("GPGGA,120000.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
    lost = nmea("GPGGA,120001.00,4807.038,N,01131.000,E,0,03,9.9,545.4,M,46.9,M,,")
    back = nmea("GPGGA,120002.00,4807.038,N,01131.000,E,2,09,0.8,545.4,M,46.9,M,,")
    assert parser.feed(good, 1.0) is None
    first = parser.feed(lost, 2.0)
    second = parser.feed(back, 3.0)
    third = parser.flush(3.5)
    assert first is not None and second is not None and third is not None
    assert [f.fix_type for f in (first, second, third)] == ["THREE_D", "NONE", "THREE_D"]
    assert second.lat is None and second.satellites == 3  # a position from quality 0 is unused
    assert [f.received for f in (first, second, third)] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("line", [UBX_GLL, UBX_GSV, UBX_ZDA, UBX_TXT,
                                  nmea("PUBX,00,081350.00,4717.113210,N,00833.915187,E"),
                                  nmea("IIGGA,120000.00,4807.038,N,01131.000,E,1,08,0.9,"
                                       "545.4,M,46.9,M,,"),
                                  nmea("GPXYZ,1,2,3")])
def test_valid_sentences_we_do_not_use_are_ignored(line: bytes) -> None:
    parser, counters = make_parser()
    assert parser.feed(line, 1.0) is None
    assert parser.flush(2.0) is None
    assert counters.snapshot("gnss.") == {"gnss.ignored": 1}


@pytest.mark.parametrize("talker", ["GP", "GN", "GL", "BD", "GA", "GB"])
def test_every_constellation_talker(talker: str) -> None:
    parser, _ = make_parser()
    fix = epoch(parser, [
        nmea(f"{talker}RMC,101010.00,A,5130.0000,S,00010.5000,W,10.0,180.00,150624,,,D"),
        nmea(f"{talker}GGA,101010.00,5130.0000,S,00010.5000,W,2,11,0.7,12.0,M,47.0,M,,"),
        nmea(f"{talker}GSA,A,2,01,02,03,,,,,,,,,,1.2,0.7,1.0"),
    ])
    assert fix.position == pytest.approx((-51.5, -0.175))
    assert fix.fix_type == "TWO_D"  # GSA says 2D even though GGA has an altitude
    assert fix.utc == utc(2024, 6, 15, 10, 10, 10)


def test_multi_constellation_gsa_per_system() -> None:
    parser, _ = make_parser()
    fix = epoch(parser, [
        nmea("GNRMC,000001.00,A,4807.0380,N,01131.0000,E,0.0,,010124,,,A,V"),
        nmea("GNGGA,000001.00,4807.0380,N,01131.0000,E,1,12,0.6,545.4,M,46.9,M,,"),
        nmea("GPGSA,A,3,02,05,07,13,15,18,20,29,,,,,1.1,0.6,0.9"),
        nmea("GLGSA,A,3,65,66,75,,,,,,,,,,1.1,0.6,0.9"),
        nmea("BDGSA,A,1,,,,,,,,,,,,,1.1,0.6,0.9"),  # a system not in use says "no fix"
        nmea("GNGSA,A,3,02,07,11,,,,,,,,,,1.1,0.6,0.9,3"),  # NMEA 4.10: Galileo by systemId
        nmea("GNGSA,A,3,02,07,,,,,,,,,,,1.1,0.6,0.9,1"),  # GPS again: not counted twice
    ])
    assert fix.fix_type == "THREE_D"
    assert fix.satellites == 8 + 3 + 3  # more than GGA's 12 cap
    assert fix.heading is None  # empty course
    assert fix.speed_kmh == 0.0


def test_new_time_of_day_completes_the_previous_epoch() -> None:
    parser, counters = make_parser()
    rmc = "GNRMC,{t},A,4807.0380,N,01131.0000,E,1.0,90.0,010124,,,A"
    assert parser.feed(nmea(rmc.format(t="080000.00")), 1.0) is None
    assert parser.feed(nmea("GNVTG,90.0,T,,M,1.0,N,1.9,K,A"), 1.1) is None
    fix = parser.feed(nmea(rmc.format(t="080001.00")), 2.0)
    assert fix is not None and fix.utc == utc(2024, 1, 1, 8, 0, 0) and fix.received == 1.1
    assert fix.speed_kmh == 1.9
    assert parser.flush(2.5) is not None
    assert parser.flush(3.0) is None  # nothing pending
    assert counters.get("gnss.fixes") == 2


def test_epochs_without_time_split_on_a_repeated_sentence() -> None:
    parser, _ = make_parser()
    cold = nmea("GPGGA,,,,,,0,00,99.99,,,,,,")
    assert parser.feed(cold, 1.0) is None
    fix = parser.feed(cold, 2.0)
    assert fix is not None and fix.fix_type == "NONE" and fix.utc is None


def test_midnight_rollover_for_gga_only_epochs() -> None:
    parser, _ = make_parser()
    gga = "GPGGA,{t},4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
    first = epoch(parser, [nmea("GPRMC,235959.00,A,4807.038,N,01131.000,E,0.0,,311223,,,A")])
    assert first.utc == utc(2023, 12, 31, 23, 59, 59)
    after = [epoch(parser, [nmea(gga.format(t=t))]) for t in ("000000.00", "000001.00")]
    assert [f.utc for f in after] == [utc(2024, 1, 1, 0, 0, 0), utc(2024, 1, 1, 0, 0, 1)]


@pytest.mark.parametrize(("line", "kind"), [
    (UBX_GGA.replace(b"*5B", b"*5C"), "checksum"),
    (UBX_GGA.replace(b"*5B", b""), "checksum"),
    (UBX_GGA.replace(b"*5B", b"*G1"), "checksum"),
    (UBX_GGA[:30], "checksum"),  # a sentence cut short
    (b"\xb5\x62\x01\x07\x5c\x00\x10\x27\x00\x00\xe8\x07\x01", "garbage"),
    (b"17.11399,N,00833.91590,E,1,08,1.01,499.6,M,48.0,M,,*5B", "garbage"),
    (b"$" + b"A" * 200, "garbage"),
    (b"$GPGGA,\xff\xfe*00", "garbage"),
])
def test_framing_errors_are_counted_and_logged_once(
        line: bytes, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    parser, counters = make_parser()
    assert parser.feed(line, 1.0) is None
    assert counters.snapshot("gnss.") == {f"gnss.errors.{kind}": 1}
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.exc_info is None and record.getMessage().isprintable()
    assert len(record.getMessage()) < 160
    # The parser goes on as if nothing happened.
    assert epoch(parser, [UBX_GGA]).satellites == 8


def test_lowercase_checksum_digits_are_accepted() -> None:
    parser, counters = make_parser()
    assert epoch(parser, [UBX_GGA.replace(b"*5B", b"*5b")]).valid
    assert counters.get("gnss.errors.checksum") == 0


GOOD_GGA = "GPGGA,120000.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"


@pytest.mark.parametrize("body", [
    GOOD_GGA.replace("4807.038", "48x7.038"),
    GOOD_GGA.replace(",N,", ",Q,"),
    GOOD_GGA.replace("4807.038", "9907.038"),
    GOOD_GGA.replace("4807.038", "4875.038"),  # 75 minutes of arc
    GOOD_GGA.replace("4807.038,N", ",N"),  # longitude without latitude
    GOOD_GGA.replace("120000.00", "256100.00"),
    GOOD_GGA.replace(",1,08,", ",9,08,"),
    GOOD_GGA.replace(",1,08,", ",1,-8,"),
    GOOD_GGA.replace("545.4", "nan"),
    GOOD_GGA.replace("0.9", "inf"),
    "GPGGA,120000.00,4807.038,N",
    "GPRMC,120000.00,X,4807.038,N,01131.000,E,0.0,,010124,,,A",
    "GPRMC,120000.00,A,4807.038,N,01131.000,E,0.0,,311324,,,A",
    "GPRMC,120000.00,A,4807.038,N,01131.000,E,-3.0,,010124,,,A",
    "GPRMC,120000.00,A,4807.038,N,01131.000,E,3.0,361.0,010124,,,A",
    "GPVTG,77.52,T,,M,0.004,N,fast,K,A",
    "GPGSA,A,4,01,02,,,,,,,,,,,1.2,0.7,1.0",
    "GPGSA,A,3,01,xx,,,,,,,,,,,1.2,0.7,1.0",
    "GNGNS,103600.01,5114.51176,N,00012.29380,W,AZNN,07,1.18,111.5,45.6,,,V",
    "gpgga,120000.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,",
])
def test_malformed_fields_refuse_the_sentence(
        body: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    parser, counters = make_parser()
    assert parser.feed(nmea(body), 1.0) is None
    assert parser.flush(2.0) is None  # nothing of it entered an epoch
    assert counters.snapshot("gnss.") == {"gnss.errors.malformed": 1}
    assert [r.exc_info for r in caplog.records] == [None]


def test_a_flood_of_gsa_without_a_timed_sentence_is_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    parser, counters = make_parser()
    # 80 GSAs, twelve new satellites each, and never a time or a quiet line to end the epoch.
    for k in range(80):
        svs = ",".join(f"{12 * k + n:02d}" for n in range(1, 13))
        assert parser.feed(nmea(f"GNGSA,A,3,{svs},1.2,0.7,1.0,1"), 1.0 + k * 0.01) is None
    assert counters.get("gnss.gsa_dropped") == 80 - 16
    assert counters.get("gnss.sentences") == 16
    messages = {r.getMessage() for r in caplog.records}  # this log never holds back
    assert messages == {"GNSS: more than 16 GSA sentences in one epoch; "
                        "the extra ones are ignored"}
    # The epoch still completes normally, with only what it took in.
    fix = epoch(parser, [UBX_GGA], received=2.0)
    assert fix.fix_type == "THREE_D" and fix.satellites == 16 * 12
