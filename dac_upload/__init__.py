"""dac-upload: move large file trees from a Slurm cluster into Rucio with job arrays."""

__version__ = "0.2.0"
