"""The lab's commands: the matrix (bench, runner, estimate), the probes, the pretrained base
(pretrain) and the micro-benchmarks."""
