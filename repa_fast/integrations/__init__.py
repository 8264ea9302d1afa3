"""Integrations with other libraries: diffusers capture hooks, vision encoders, the regularizers
a training loop calls, SimpleTuner."""
