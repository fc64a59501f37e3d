"""Round loop, client sampling and placement, aggregators, client state store, checkpoints."""

from fedprompt.federation.aggregators import Aggregator, NoCommunication, WeightedMean, state_bytes

__all__ = ["Aggregator", "NoCommunication", "WeightedMean", "state_bytes"]
