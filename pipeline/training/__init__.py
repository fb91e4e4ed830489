"""Training mechanics both trainers share (student.train for CTD, lma.finetune for LMA): process
groups, checkpoints, metrics, RNG state, the LR schedule, resume checks and the non-finite step
guard. Each module is one idea; the loops that compose them stay in their own packages."""
