"""Studies built on the core (not part of training or evaluation):

  deep_supervision  the paper's deep-supervision and pruning study
                    (python -m unetpp_jax.ablate_deep_supervision)
  throughput        timing of the train step, pruned inference and the input
                    (python -m unetpp_jax.benchmark)
"""
