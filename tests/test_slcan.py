"""slcan (serial-line CAN USB adapters) end to end, with a real pty as the adapter."""

from __future__ import annotations

import asyncio
import os

from gateway.app import Pipeline
from gateway.clock import SystemClock
from gateway.decode import load_dbc
from tests.conftest import DBC

TB = "Vehicle.Powertrain.TractionBattery"


async def test_slcan_adapter_frames_reach_the_state(ref_profile):
    master, slave = os.openpty()
    pipeline = Pipeline.build(ref_profile, SystemClock())
    options = pipeline.bus_options({"vehicle": f"slcan:{os.ttyname(slave)}"})
    pipeline.start_live(options)
    try:
        # The adapter is told the profile's bitrate (S6 = 500 kbit/s) and opened.
        setup = b""
        while b"O\r" not in setup:
            setup += await asyncio.wait_for(asyncio.to_thread(os.read, master, 64), 10)
        assert b"S6\r" in setup
        bms = load_dbc(DBC / "reference" / "microev_bms.dbc")
        soc = bms.get_message_by_name("BMS_Soc")
        data = soc.encode({s.name: 0 for s in soc.signals} | {"BMS_SoC": 64.2})
        obc = bms.get_message_by_name("OBC_Status")
        obc_data = obc.encode({s.name: 0 for s in obc.signals} | {"OBC_OutputCurrent": 30.5})
        # slcan ASCII: t<3-hex id><len><data> for 11-bit, T<8-hex id>... for 29-bit.
        os.write(master, f"t{soc.frame_id:03X}{len(data)}{data.hex().upper()}\r".encode())
        os.write(master, f"T{obc.frame_id:08X}{len(obc_data)}{obc_data.hex().upper()}\r"
                 .encode())
        os.write(master, b"t7DF3010C00\r")  # an OBD request nobody mapped
        store = pipeline.store
        for _ in range(200):
            now = pipeline.clock.time()
            if pipeline.counters.get("can.vehicle.frames") >= 3:
                break
            await asyncio.sleep(0.02)
        now = pipeline.clock.time()
        assert store.good_value(f"{TB}.StateOfCharge.Current", now) == 64.2
        assert store.good_value(f"{TB}.Charging.ChargeCurrent.DC", now) == 30.5
        assert pipeline.counters.get("decode.unknown_id") == 1
    finally:
        await pipeline.stop()
        os.close(master)
        os.close(slave)
