"""slurm: the pure parsers of sbatch / scontrol / squeue output (no Slurm needed)."""

from __future__ import annotations

from dac_upload.slurm import (
    last_error_line,
    parse_scontrol_config,
    parse_squeue_states,
)

SCONTROL = """\
Configuration data as of 2024-05-01T10:00:00
AccountingStorageBackupHost = (null)
AccountingStorageEnforce = associations,limits,qos
AuthType                = auth/munge
BOOT_TIME               = 2024-05-01T09:58:12
ClusterName             = csd3
DefMemPerNode           = UNLIMITED
MaxArraySize            = 1001
MaxJobCount             = 10000
SchedulerParameters     = bf_max_job_user=10,default_queue_depth=100
SLURM_VERSION           = 23.02.7

Cgroup Support Configuration:
AllowedRAMSpace         = 100.0%

MPI Plugins Configuration:
PMIxCliTmpDirBase       = (null)
Slurmctld(primary) at head is UP
"""


def test_parse_scontrol_config() -> None:
    cfg = parse_scontrol_config(SCONTROL)
    assert cfg["MaxArraySize"] == "1001"
    assert cfg["ClusterName"] == "csd3"
    assert cfg["AccountingStorageEnforce"] == "associations,limits,qos"
    assert cfg["SchedulerParameters"] == "bf_max_job_user=10,default_queue_depth=100"
    assert cfg["BOOT_TIME"] == "2024-05-01T09:58:12"
    assert cfg["SLURM_VERSION"] == "23.02.7"
    assert cfg["AllowedRAMSpace"] == "100.0%"
    assert cfg["AccountingStorageBackupHost"] == "(null)"
    # headers and status lines are not keys
    assert not any(" " in key for key in cfg)
    assert len(cfg) == 12


def test_parse_scontrol_config_empty() -> None:
    assert parse_scontrol_config("") == {}


def test_parse_squeue_states() -> None:
    assert parse_squeue_states("7_0 RUNNING\n7_[1-3%2] PENDING\n") == {
        "7_0": "RUNNING", "7_[1-3%2]": "PENDING"}
    assert parse_squeue_states("\n  \n8 COMPLETED\nodd\n") == {"8": "COMPLETED"}
    assert parse_squeue_states("") == {}


def test_last_error_line_picks_the_error() -> None:
    stderr = ("sbatch: warning: can't honor --ntasks-per-node\n"
              "sbatch: error: Batch job submission failed: Invalid account or account/partition"
              " combination specified\n")
    assert last_error_line(stderr) == ("sbatch: error: Batch job submission failed: Invalid "
                                        "account or account/partition combination specified")


def test_last_error_line_without_error_word() -> None:
    assert last_error_line("  \nsomething odd\nlast words  \n") == "last words"
    assert last_error_line("") == "(sbatch printed nothing)"
    assert last_error_line("\n\n") == "(sbatch printed nothing)"


def test_parse_array_states_squeue_and_sacct() -> None:
    from dac_upload.slurm import parse_array_states

    squeue = "12 0 COMPLETED\n12 1 RUNNING\n12 2 PENDING\n13 N/A PENDING\ngarbage\n"
    assert parse_array_states(squeue) == {("12", 0): "COMPLETED", ("12", 1): "RUNNING",
                                          ("12", 2): "PENDING"}
    sacct = "12_0|COMPLETED\n12_1|CANCELLED by 1000\n12_[2-4%2]|PENDING\n13|COMPLETED\n"
    assert parse_array_states(sacct) == {("12", 0): "COMPLETED", ("12", 1): "CANCELLED",
                                         ("12", 2): "PENDING", ("12", 3): "PENDING",
                                         ("12", 4): "PENDING"}
