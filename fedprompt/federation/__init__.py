"""One federated round: the round driver and its transport seam, the sampler, the server, the clients, the evaluator,
the aggregators, the lock-step engine and its batches, privacy, checkpoints (see docs/runtimes.md)."""

from fedprompt.federation.aggregators import Aggregator, NoCommunication, WeightedMean, state_bytes

__all__ = ["Aggregator", "NoCommunication", "WeightedMean", "state_bytes"]
