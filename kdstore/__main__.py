"""`python -m kdstore ...` (also what torchrun runs: `torchrun --nproc-per-node N -m kdstore label ...`)."""

from kdstore.cli import main

main()
