"""The idle self-test of cameras and microphones (docs/self-test.md).

figures.py measures frames and samples; run.py drives a capture under the idle guard;
v4l2.py and alsa.py are Linux's captures, synthetic.py the simulated bus's; schedule.py
decides when a device is tested and turns results into protocol events.
"""
