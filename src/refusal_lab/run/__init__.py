"""The `refusal-lab run` pipeline: config, run folder, inputs, steps, results schema, findings."""
