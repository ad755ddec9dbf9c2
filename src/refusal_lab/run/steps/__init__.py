"""The run's steps, one module each (see :data:`refusal_lab.run.pipeline.STEPS` for their order)."""
