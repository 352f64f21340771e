"""Hardware-in-the-loop rig: a simulated reference vehicle and the tools around it."""
