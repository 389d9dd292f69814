"""Run one self-test capture in the rig's guest and print its result as JSON (for looking by hand).

    python3 selftest_once.py video /dev/video1 [/dev/video2 ...]
    python3 selftest_once.py audio /dev/snd/pcmC1D0c
"""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import partial

from agent.selftest.alsa import AlsaCapture
from agent.selftest.run import SelfTest, Settings, run
from agent.selftest.v4l2 import V4l2Capture

kind, nodes = sys.argv[1], sys.argv[2:]
opener = partial(V4l2Capture, nodes) if kind == "video" else partial(AlsaCapture, nodes[0])
res = run(SelfTest(kind, nodes[0], opener, nodes), Settings(first_frame_s=10))
print(json.dumps(dataclasses.asdict(res)))
