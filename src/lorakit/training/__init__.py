"""Training: the settings (`config`), the data pipeline (`data`), the chunked loss (`loss`), the
loop (`trainer`) and its output directory (`rundir`)."""
