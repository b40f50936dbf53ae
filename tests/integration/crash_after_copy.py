"""Test only, installed as ``sitecustomize`` on the worker's PYTHONPATH by
test_crash_between_copies_and_registration_is_repaired: a bulk task of the run named by
DAC_UPLOAD_TEST_CRASH_AFTER_COPY dies (exit 137, as if killed) right after its first chunk's
copies, before their registration. dac_upload itself carries no such hook."""

import os
import sys

RUN = os.environ.get("DAC_UPLOAD_TEST_CRASH_AFTER_COPY")


def _this_run() -> bool:
    args = sys.argv
    return "--run" in args and os.path.basename(
        args[args.index("--run") + 1].rstrip("/")) == RUN


if RUN:
    try:
        from dac_upload.upload import bulk
    except ImportError:   # a Python without dac_upload: nothing to do
        pass
    else:
        front = bulk._front

        def _front_then_crash(*args, **kwargs):
            out = front(*args, **kwargs)
            if out[1] and _this_run():   # copied, not registered
                os._exit(137)
            return out

        bulk._front = _front_then_crash
