"""Secure aggregation of the shared prompts with Flower's SecAgg+ (``secure-aggregation = true``).

The server runs Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` for the training half of each round; the
ClientApp answers it through Flower's ``secaggplus_mod`` (applied to the SecAgg+ messages only). Each client trains
exactly as without it and hands its upload, in the order of the server's key list, to the mod, which scales it by
its weight (its train-sample count, or 1 for an unweighted mean), clips it to [-c, c], quantises it to integers in
[0, Q) with stochastic rounding, masks it (pairwise and private masks) and sends only the masked vector. The server
recovers the sum, never an individual upload, and Flower turns it into the weighted mean.

The quantisation error: each client's scaled upload is rounded to a step of ``2c / Q``, so each value of the secure
mean differs from the plain weighted mean by at most ``n * (2c / Q) / sum(r_i)`` (n: clients in the sum; r_i: their
weights divided by ``max_weight``, which fedprompt sets to the largest weight so that the largest r_i is 1), plus
the rounding of each r_i to ``1 / Q`` (relative ``0.5 / (r_i Q)``), provided every shared value lies in [-c, c]
(:func:`error_bound`). With c = 8, Q = 2**22 and 4 clients of similar size, that is about 1.5e-5 per value.

Only aggregators whose merge is the plain weighted mean (:class:`~fedprompt.federation.aggregators.WeightedMean`'s
``aggregate``: PromptFL, FedProx, FedPer, FedOTP, FedPGP, PromptFolio, FedTPG) can be summed; FedMGP's
similarity-guided selection, pFedMoAP's expert store, PromptSRC's running average, DP-FPL's released server noise and
client-level DP need more than the sum and are refused with one line.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from fedprompt.errors import FedPromptError
from fedprompt.federation.aggregators import WeightedMean, state_bytes
from fedprompt.federation.clients import Report


def check_secure(parts) -> None:
    """One line when the method's aggregation cannot be a secure sum, the server must see each upload, or a round
    would sum fewer than 2 clients."""
    method, server = parts.method, parts.server
    if not method.communicates:
        return
    rule = type(server.aggregator)
    if not issubclass(rule, WeightedMean) or rule.aggregate is not WeightedMean.aggregate:
        raise FedPromptError(f"secure-aggregation: {method.name}'s aggregator ({rule.__name__}) needs every client's "
                             "upload, not only their sum; SecAgg+ works for plain weighted-mean aggregators "
                             "(PromptFL, FedOTP, FedPGP, ...). Set secure-aggregation = false.")
    if server.upload_steps:
        raise FedPromptError("secure-aggregation: the server's upload steps need every client's upload, which SecAgg+ "
                             "never shows it. Set secure-aggregation = false.")
    federation, total = parts.sampler.federation, len(parts.clients)
    count = max(1, int(round(federation.fraction * total)))
    if min(count, total) < 2:
        raise FedPromptError("secure-aggregation: SecAgg+ needs at least 2 clients in a round; raise "
                             "--federation.fraction or use more clients.")


def weight_of(server, cid: int) -> int:
    """The weight a client's upload enters the mean with (its train-sample count, or 1 for an unweighted mean)."""
    return server.sizes[cid] if server.aggregator.weighted else 1


def error_bound(weights: list[float], clipping_range: float, quantization_range: int) -> float:
    """The largest difference per value between the SecAgg+ mean and the plain weighted mean (values within
    [-c, c]): ``n (2c / Q) / sum(r_i)`` with ``r_i = w_i / max(w)``, plus the weight rounding."""
    top = max(weights)
    ratios = [w / top for w in weights]
    step = 2 * clipping_range / quantization_range
    rounding = clipping_range * sum(0.5 / quantization_range for _ in ratios) / sum(ratios)
    return len(weights) * step / sum(ratios) + 2 * rounding


# ------------------------------------------------------------------------------------------------ client side
def read_fit_instructions(msg) -> tuple[dict, dict, dict]:
    """(config, received global state, aggregator state) of a SecAgg+ train message (legacy ``FitIns``)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    from fedprompt.flower.node import from_bytes

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = dict(fitins.config)
    keys = json.loads(str(cfg["keys"]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    received = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays)}
    return cfg, received, from_bytes(cfg.pop("aggregator"))


def fit_reply(msg, node, upload: dict, report):
    """The reply the SecAgg+ mod masks: the upload in the server's key order, the client's weight as
    ``num_examples``, its loss and steps as metrics."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    fitins_cfg = compat.recorddict_to_fitins(msg.content, keep_input=True).config
    keys = json.loads(str(fitins_cfg["keys"]))
    if sorted(keys) != sorted(upload):
        raise FedPromptError(f"client {node.cid}: its upload has the keys {sorted(upload)}, the server sums "
                             f"{sorted(keys)}; start the node with the run's config.")
    weight = node.num_train if node.aggregator.weighted else 1
    arrays = [upload[k].detach().cpu().float().numpy() for k in keys]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight,
                    {"loss": float(report.loss), "steps": int(report.steps), "cid": node.cid})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


# ------------------------------------------------------------------------------------------------ server side
def secure_train(transport, round_idx: int, cids: list[int]) -> tuple[dict, dict | None]:
    """The training half of a round through Flower's SecAgg+ workflow: each client's report (a client left out of
    the secure sum is lost) and the weighted mean of the uploads (``None`` when no sum was made)."""
    server = transport.server
    template = server.global_state
    chosen = [cid for cid in cids if cid in transport.nodes]
    outcome = _run_workflow(transport, round_idx, chosen, template) if len(chosen) >= 2 else {}
    by_node = {nid: cid for cid, nid in transport.nodes.items()}
    losses = {by_node[proxy.node_id]: res for proxy, res in outcome.get("results", []) if proxy.node_id in by_node}
    reasons = "; ".join(str(f) for f in outcome.get("failures", [])) or "no SecAgg+ result"
    reports = {}
    for cid in cids:
        if cid not in transport.nodes:
            reports[cid] = Report(failure="no node holds this client", lost=True)
        elif cid not in losses:
            reports[cid] = Report(failure=f"left out of the secure sum ({reasons})", lost=True)
        else:
            metrics = losses[cid].metrics
            reports[cid] = Report(float(metrics.get("loss", float("nan"))), int(metrics.get("steps", 0)),
                                  upload_bytes=state_bytes(template))  # the server never sees an upload
    mean = None
    if losses and outcome.get("results"):
        from flwr.common import parameters_to_ndarrays

        values = parameters_to_ndarrays(outcome["results"][0][1].parameters)
        mean = {k: torch.from_numpy(np.asarray(a)).to(template[k].dtype).reshape(template[k].shape)
                for k, a in zip(template, values)}
    return reports, mean


def _run_workflow(transport, round_idx: int, chosen: list[int], template: dict) -> dict:
    """Run Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` for the clients ``chosen``; returns its
    results (``(proxy, FitRes)`` of the clients in the sum, the first holding the mean) and failures."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    server, options = transport.server, transport.options
    outcome: dict = {}
    strategy = _round_strategy(transport, round_idx, chosen, template, outcome)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=round_idx), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_idx})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        {k: v.detach().cpu().contiguous() for k, v in template.items()})
    weights = [weight_of(server, cid) for cid in chosen] or [1]
    workflow = SecAggPlusWorkflow(num_shares=options.secagg_num_shares,
                                  reconstruction_threshold=options.secagg_reconstruction_threshold,
                                  max_weight=float(max(weights)), clipping_range=options.secagg_clipping_range,
                                  quantization_range=options.secagg_quantization_range, timeout=options.timeout)
    workflow(transport.grid, context)
    return outcome


def _round_strategy(transport, round_idx: int, chosen: list[int], template: dict, outcome: dict):
    """A legacy Flower strategy that hands the workflow fedprompt's clients and keeps what it computed."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server.strategy import Strategy as LegacyStrategy

    keys = list(template)

    class _Round(LegacyStrategy):
        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            pairs = []
            for cid in chosen:
                config = transport.instructions(cid, round_idx - 1, round=round_idx, keys=json.dumps(keys))
                received = transport.server.download(cid)
                arrays = [received[k].detach().cpu().numpy() for k in keys]
                pairs.append((_proxy(cid, transport.nodes[cid]), FitIns(ndarrays_to_parameters(arrays), config)))
            return pairs

        def aggregate_fit(self, server_round, results, failures):
            outcome["results"], outcome["failures"] = list(results), failures
            return (results[0][1].parameters if results else None), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return _Round()


def _proxy(cid: int, node_id: int):
    """A client proxy that only names a node (the workflow sends through the grid itself)."""
    from flwr.server.client_proxy import ClientProxy

    class _Proxy(ClientProxy):
        def __init__(self):
            super().__init__(str(cid))
            self.node_id = node_id

        def get_properties(self, ins, timeout, group_id):
            raise NotImplementedError

        def get_parameters(self, ins, timeout, group_id):
            raise NotImplementedError

        def fit(self, ins, timeout, group_id):
            raise NotImplementedError

        def evaluate(self, ins, timeout, group_id):
            raise NotImplementedError

        def reconnect(self, ins, timeout, group_id):
            raise NotImplementedError

    return _Proxy()
