"""Test only, installed as ``sitecustomize`` on the worker's PYTHONPATH by
test_killed_while_packing_then_resubmitted: the first attempt of a task of the run named by
DAC_UPLOAD_TEST_CRASH_PACKING ("RUN_ID:build" or "RUN_ID:members") dies (exit 137, as if
killed) half-way through writing its archive, or once the archive is uploaded and protected
but before its members are registered. dac_upload itself carries no such hook."""

import os
import sys

RUN, _, POINT = os.environ.get("DAC_UPLOAD_TEST_CRASH_PACKING", "").partition(":")


def _run_dir():
    args = sys.argv
    if "--run" not in args:
        return None
    run_dir = args[args.index("--run") + 1].rstrip("/")
    return run_dir if os.path.basename(run_dir) == RUN else None


def _first_time() -> bool:
    """True once per run: a marker file in the run directory says the crash happened."""
    run_dir = _run_dir()
    if run_dir is None:
        return False
    try:
        os.close(os.open(os.path.join(run_dir, "crashed-once"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


if RUN:
    try:
        from dac_upload.upload import archive, packed
    except ImportError:   # a Python without dac_upload: nothing to do
        pass
    else:
        if POINT == "build":
            add, seen = archive._add_member, [0]

            def _add_then_crash(*args, **kwargs):
                seen[0] += 1
                if seen[0] == 10 and _first_time():   # ten members written, then killed
                    os._exit(137)
                return add(*args, **kwargs)

            archive._add_member = _add_then_crash
        else:
            members = packed._members

            def _crash_before_members(*args, **kwargs):
                if _first_time():
                    os._exit(137)
                return members(*args, **kwargs)

            packed._members = _crash_before_members
