"""How many examples ``unipt plan`` extracts and times by default. Apart from the planner
(:mod:`unipt.pipeline.experiment.plan`, which imports torch) so that the CLI states it in
``unipt plan --help`` without loading the planner: one number, written once."""

SAMPLE_EXAMPLES = 256
