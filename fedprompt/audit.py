"""``fedprompt audit RUN_DIR``: a membership-inference audit of a finished run's prompts.

An epsilon is a bound; an audit measures what an attacker actually learns. For every client of the run:

1. **the split** (:func:`audit_split`): its members are its train images (what it trained on), its non-members as
   many of its test images (never trained on by anyone, from the same distribution), drawn with ``--audit_seed``;
2. **the target's scores** (:func:`example_scores`): the client's final prompts (the run's checkpoint) on its
   members and non-members: the loss, and the logit-scaled confidence ``phi = z_y - logsumexp_{j != y} z_j``
   (``log p_y - log (1 - p_y)``, computed from the logits without rounding to probabilities);
3. **the shadows** (:func:`train_shadows`, LiRA: Carlini, Chien, Nasr, Song, Terzis, Tramer, "Membership Inference
   Attacks From First Principles", IEEE S&P 2022): ``--shadows`` S federations trained by the run's method on the
   run's protocol (its rounds, sampling, local steps, server rule, client-level DP, robust rule; the run's attack
   is never simulated), each client of shadow s training on the examples of its client that are *in* s; every
   example is in exactly half of the shadows (:func:`shadow_keep`). The S federations run together: their clients
   are slots of one client pool, trained K at a time by the lock-step engine (methods whose clients read the
   round's global state, FedProx's proximal term for one, train one shadow's clients per group);
4. **the attacks** (:func:`attack_scores`): the loss threshold (Yeom et al. 2018: a lower loss says member), LiRA
   online (the log-likelihood ratio of the target's ``phi`` under Gaussians fitted to the example's in and out
   shadows) and offline (the standardised ``phi`` against the out shadows alone, one-sided); variances pooled over
   all examples (``--variance global``) or each example's own;
5. **the figures** (:func:`roc_figures`, torchmetrics' ROC): AUC and the true-positive rate at 1 % and 0.1 %
   false-positive rate, over all clients' examples and per client.

It writes ``RUN_DIR/audit/`` only (the run's own files never change): ``result.json`` (the figures and the
settings), ``split.json`` (each client's members and non-members) and ``scores.pt`` (every example's scores, the
shadows' ``phi`` and which shadows each example was in: enough to recompute any figure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedprompt.errors import FedPromptError
from fedprompt.federation.sampling import derive_seed

#: separates the audit's random streams from the run's
AUDIT_STREAM = 0x41554454
#: the false-positive rates of the TPR figures
FPRS = (0.01, 0.001)
#: the attacks in the order they are reported
ATTACKS = ("loss", "lira_offline", "lira")


@dataclass
class Example:
    """One audited image: its client, the sample and whether the client trained on it."""

    client: int
    sample: object
    member: bool


# ------------------------------------------------------------------------------------------------ the split
def audit_split(clients: list, seed: int) -> list[Example]:
    """Every client's members (its train images) and as many non-members (its test images, drawn without
    replacement; all of them when it has fewer), in client order."""
    out = []
    for client in clients:
        rng = np.random.default_rng([seed, AUDIT_STREAM, client.client_id])
        count = min(len(client.train), len(client.test))
        picked = sorted(rng.choice(len(client.test), size=count, replace=False).tolist())
        out += [Example(client.client_id, s, True) for s in client.train]
        out += [Example(client.client_id, client.test[i], False) for i in picked]
    return out


def shadow_keep(examples: list[Example], shadows: int, seed: int) -> torch.Tensor:
    """``[S, N]`` bool: whether example n is in shadow s; every example is in exactly ``S // 2`` shadows (a random
    set of them, Carlini et al.'s assignment)."""
    if shadows == 0:
        return torch.zeros((0, len(examples)), dtype=torch.bool)
    rng = np.random.default_rng([seed, AUDIT_STREAM, shadows])
    order = rng.random((shadows, len(examples))).argsort(0)
    return torch.from_numpy(order < shadows // 2)


# ------------------------------------------------------------------------------------------------ the attacks
def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``phi = z_y - logsumexp_{j != y} z_j`` per row (float64): ``log(p_y / (1 - p_y))`` of the softmax."""
    z = logits.to(torch.float64)
    rows = torch.arange(len(labels))
    others = z.clone()
    others[rows, labels] = -math.inf
    return z[rows, labels] - torch.logsumexp(others, dim=1)


def gaussian_fit(values: torch.Tensor, mask: torch.Tensor, pooled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (column) the mean of ``values`` where ``mask`` holds, and the standard deviation: pooled over
    every example's deviations from its own mean (``pooled``), or the example's own."""
    weight = mask.to(torch.float64)
    count = weight.sum(0)
    mean = (values * weight).sum(0) / count
    squares = ((values - mean) ** 2) * weight
    if pooled:
        std = torch.full_like(mean, float((squares.sum() / count.sum()).sqrt()))
    else:
        std = (squares.sum(0) / count).sqrt()
    return mean, std.clamp_min(1e-12)


def attack_scores(loss: torch.Tensor, phi: torch.Tensor, shadow_phi: torch.Tensor, keep: torch.Tensor,
                  variance: str = "global") -> dict[str, torch.Tensor]:
    """Every attack's membership score per example (higher: more likely a member): ``loss`` (minus the loss),
    ``lira`` and ``lira_offline`` when there are shadows (module docstring)."""
    out = {"loss": -loss.to(torch.float64)}
    if shadow_phi.shape[0] == 0:
        return out
    pooled = variance == "global"
    in_mean, in_std = gaussian_fit(shadow_phi, keep, pooled)
    out_mean, out_std = gaussian_fit(shadow_phi, ~keep, pooled)
    normal_in = torch.distributions.Normal(in_mean, in_std)
    normal_out = torch.distributions.Normal(out_mean, out_std)
    out["lira_offline"] = (phi - out_mean) / out_std
    out["lira"] = normal_in.log_prob(phi) - normal_out.log_prob(phi)
    return out


def roc_figures(scores: torch.Tensor, members: torch.Tensor) -> dict:
    """AUC and the TPR at each of :data:`FPRS` (the highest TPR whose FPR does not exceed it) of ``scores`` for
    the ``members`` labels (torchmetrics' binary ROC on the scores' ranks, so no score saturates), and the counts."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    values, ranks = torch.unique(scores.to(torch.float64), return_inverse=True)
    preds = ranks.to(torch.float64) / max(1, len(values) - 1)
    target = members.to(torch.long)
    out = {"members": int(target.sum()), "non_members": int((1 - target).sum())}
    if out["members"] == 0 or out["non_members"] == 0:
        return {**out, "auc": None, **{f"tpr_at_{fpr:g}_fpr": None for fpr in FPRS}}
    out["auc"] = float(binary_auroc(preds, target))
    fpr, tpr, _ = binary_roc(preds, target)
    for limit in FPRS:
        out[f"tpr_at_{limit:g}_fpr"] = float(tpr[fpr <= limit + 1e-12].max())
    return out


def figures(scores: dict[str, torch.Tensor], members: torch.Tensor, clients: torch.Tensor,
            names: list[str]) -> dict:
    """Each attack's :func:`roc_figures` over all examples (``overall``) and per client (by name)."""
    out = {}
    for attack, values in scores.items():
        per_client = {name: roc_figures(values[clients == cid], members[clients == cid])
                      for cid, name in enumerate(names)}
        out[attack] = {"overall": roc_figures(values, members), "clients": per_client}
    return out


# ------------------------------------------------------------------------------------------------ the federation
def audit_clients(splits, examples: list[Example], keep: torch.Tensor) -> list:
    """The client list of the audit's pool: the run's clients (``0 .. n-1``: their members as train data, their
    audit examples as test data) then every shadow's (``n + s n + k``: the examples of client k in shadow s)."""
    from fedprompt.data.base import ClientSplit

    n = len(splits.clients)
    by_client = [[i for i, e in enumerate(examples) if e.client == k] for k in range(n)]
    out = []
    for client in splits.clients:
        audited = [examples[i].sample for i in by_client[client.client_id]]
        out.append(replace(client, test=audited, val=[]))
    for s in range(keep.shape[0]):
        for client in splits.clients:
            train = [examples[i].sample for i in by_client[client.client_id] if keep[s, i]]
            if not train:
                raise FedPromptError(f"audit: shadow {s} got none of client {client.client_id}'s "
                                     f"{len(by_client[client.client_id])} audit examples; the client has too few "
                                     "images for shadows (use --shadows 0 or another --audit_seed).")
            out.append(replace(client, client_id=n + s * n + client.client_id, train=train,
                               test=out[client.client_id].test, val=[], name=f"shadow{s}/{client.name}"))
    return out


@dataclass
class Shadow:
    """One shadow federation: its server's rule, its sampler and its server (clients ``offset .. offset+n-1`` of
    the pool)."""

    offset: int
    sampler: object
    server: object


def shadow_federations(fabric, run, parts, shadows: int, seed: int) -> list[Shadow]:
    """The S shadow federations' servers and samplers (the run's rule, DP and robust rule; the seeds of their
    sampling, data order and server randomness derived from the audit seed and the shadow)."""
    from fedprompt.build import _build_aggregator
    from fedprompt.federation.robust import install_norm_bound
    from fedprompt.federation.sampler import Sampler
    from fedprompt.federation.server import Server

    n = len(parts.clients) // (shadows + 1)
    out = []
    for s in range(shadows):
        offset = n + s * n
        shadow_seed = derive_seed(seed, AUDIT_STREAM, s)
        sizes = [len(parts.clients[offset + k].train) for k in range(n)]
        aggregator = _build_aggregator(fabric, run, n, quiet=True)
        aggregator.seed = shadow_seed
        sampler = Sampler(aggregator, sizes, run.federation, run.train, getattr(run.method, "optim", None),
                          shadow_seed)
        server = Server(run.method, aggregator, sizes, run.federation, sampler, run.train)
        install_norm_bound(server)
        server.start(parts.initial)
        for k in range(n):
            parts.pool.states[offset + k] = run.method.initial_client_state(
                k, {key: v.clone() for key, v in parts.initial.items()})
        out.append(Shadow(offset, sampler, server))
    return out


def _shadow_plans(shadow: Shadow, round_idx: int) -> list:
    plans = []
    for k in shadow.sampler.trained(round_idx):
        plan = shadow.sampler.plan(k, round_idx)
        plan.cid = shadow.offset + k
        plans.append(plan)
    return plans


def shadow_round(pool, shadows: list[Shadow], round_idx: int, together: bool) -> None:
    """One round of every shadow federation: their clients trained K at a time (every shadow's together when the
    method's clients never read the round's global state, else one shadow's per group), each shadow's uploads
    merged by its server, its clients merged with its new global state. A failed client is left out."""
    from fedprompt.federation.engine import run_groups

    for shadow in shadows:
        shadow.server.begin_round(round_idx)
    plans = [_shadow_plans(shadow, round_idx) for shadow in shadows]
    classes = lambda plan: pool.classnames_of(plan.cid)  # noqa: E731
    results: dict = {}
    if together:
        results = run_groups(pool.trainer, pool.module_for, classes, [p for ps in plans for p in ps], pool.group,
                             pool.states, None)
    else:
        for shadow, shadow_plans in zip(shadows, plans):
            results.update(run_groups(pool.trainer, pool.module_for, classes, shadow_plans, pool.group, pool.states,
                                      shadow.server.global_state))
    for shadow, shadow_plans in zip(shadows, plans):
        ok = [p.cid for p in shadow_plans if results[p.cid].failure is None]
        rule = shadow.server.aggregator
        uploads = {cid - shadow.offset: rule.upload(cid - shadow.offset, results[cid].state, round_idx) for cid in ok}
        for cid in ok:
            pool.states[cid] = results[cid].state
        if shadow.server.merges(sorted(uploads)):
            shadow.server.merge(round_idx, uploads=uploads)
            for k in range(len(shadow.sampler.sizes)):
                cid = shadow.offset + k
                pool.states[cid] = rule.apply(pool.states[cid], shadow.server.download(k), k)


def train_shadows(pool, shadows: list[Shadow], rounds: int) -> None:
    """Every round of every shadow federation (one progress line per round)."""
    from fedprompt.methods.base import PromptClient

    together = type(pool.client).on_round_start is PromptClient.on_round_start
    for round_idx in range(1, rounds + 1):
        shadow_round(pool, shadows, round_idx, together)
        print(f"audit: {len(shadows)} shadow federations, round {round_idx} of {rounds}", flush=True)


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def example_scores(pool, cids: list[int], batch_size: int) -> dict[int, tuple[torch.Tensor, ...]]:
    """``(loss, phi, correct)`` of every example of each client's test list (its audit examples), from its state
    in the pool, K clients per text pass."""
    from fedprompt.timing import NoTimer

    fabric, out = pool.fabric, {}
    for chunk in pool.chunks(cids):
        client = pool.module_for(list(pool.classnames_of(chunk[0])))
        client.eval()
        client.timer = NoTimer()
        for slot, cid in enumerate(chunk):
            client.load_slot(slot, pool.states[cid])
        slots = torch.arange(len(chunk), device=fabric.device)
        with fabric.autocast():
            text = client.text_for(slots)
        for position, cid in enumerate(chunk):
            parts = []
            for batch in pool.feed.eval_batches(f"test:{cid}", batch_size):
                batch = pool.feed.finish(fabric.to_device(batch))
                count = batch["label"].shape[0]
                batch.update(slots=slots, owner=torch.full((count,), position, dtype=torch.long,
                                                           device=fabric.device))
                with fabric.autocast():
                    logits = client.predict_logits(batch, text).float().cpu()
                labels = batch["label"].cpu()
                loss = torch.nn.functional.cross_entropy(logits.to(torch.float64), labels, reduction="none")
                parts.append((loss, logit_confidence(logits, labels), logits.argmax(1) == labels))
            out[cid] = tuple(torch.cat(values) for values in zip(*parts))
    return out


def shadow_phi(pool, shadows: list[Shadow], n: int, examples: list[Example], batch_size: int) -> torch.Tensor:
    """``[S, N]``: every shadow's ``phi`` of every audit example."""
    owners = torch.tensor([e.client for e in examples])
    out = torch.zeros((len(shadows), len(examples)), dtype=torch.float64)
    scores = example_scores(pool, [sh.offset + k for sh in shadows for k in range(n)], batch_size)
    for s, shadow in enumerate(shadows):
        for k in range(n):
            out[s, owners == k] = scores[shadow.offset + k][1]
    return out


# ------------------------------------------------------------------------------------------------ the command
def audit_folder(run_dir: Path) -> Path:
    return run_dir / "audit"


def check_audit(run, options) -> tuple[Path, dict]:
    """Everything that needs no data and no model: the run folder, its checkpoint (the method's, with client
    states), settings the audit cannot honour, a previous audit; returns the run folder and the checkpoint."""
    from fedprompt.federation.checkpoint import check_resume, load_checkpoint

    run_dir = Path(options.run_dir[0])
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FedPromptError(f"audit {run_dir}: no checkpoints/last.ckpt there; pass the run directory of a finished "
                             "fedprompt fit run.")
    checkpoint = load_checkpoint(path)
    check_resume(checkpoint, path, run.method.name, run.method.hparams())
    if not checkpoint.get("clients"):
        raise FedPromptError(f"audit {run_dir}: the checkpoint holds no client states (a Flower run whose clients keep "
                             "their own: report-states off), so there are no prompts to audit.")
    if not run.method.trains:
        raise FedPromptError(f"audit {run_dir}: {run.method.name} trains nothing, so nothing can remember a member.")
    if run.federation.central:
        raise FedPromptError(f"audit {run_dir}: a federation.central run pooled every client into one; audit a "
                             "federated run.")
    if run.attack.enabled:
        raise FedPromptError(f"audit {run_dir}: the run had malicious clients (attack.kind {run.attack.kind}), whose "
                             "training data is not their split; audit a run without an attack.")
    result = audit_folder(run_dir) / "result.json"
    if result.exists() and not run.overwrite:
        raise FedPromptError(f"audit {run_dir}: {result} exists (an earlier audit); pass --overwrite true to replace "
                             "it.")
    return run_dir, checkpoint


def run_settings(run_dir: str):
    """The run settings of a run directory (its hyperparameters.yaml, parsed as ``fedprompt fit`` parses a config),
    for ``audit`` called from Python without them."""
    from dataclasses import fields

    from fedprompt.__main__ import instantiate, parse, parsing_settings, prepare, with_audited_run
    from fedprompt.run import RunArgs

    parsing_settings()
    argv = with_audited_run(["audit", str(run_dir)])
    prepare(argv)
    _, parser, cfg = parse(argv)
    init, resolved = instantiate(parser, cfg)
    return RunArgs(**{f.name: init[f.name] for f in fields(RunArgs) if f.name != "resolved_config"},
                   resolved_config=resolved)


def _fabric(run):
    import lightning as L

    fabric = L.Fabric(accelerator=run.fabric.accelerator, devices=1, num_nodes=1, strategy="auto",
                      precision=run.fabric.precision)
    fabric.launch()
    return fabric


def _pool_run(run):
    """The run's settings for the audit's pool: no attack, personal evaluation only."""
    from fedprompt.threats import AttackArgs

    return replace(run, attack=AttackArgs(), eval=replace(run.eval, mode="personal", domains=False))


def run_audit(run, options) -> dict:
    """Audit a finished run (module docstring); returns ``result.json``'s content."""
    from fedprompt.build import build_parts, read_data_and_check_weights
    from fedprompt.data.base import FederatedSplits

    run_dir, checkpoint = check_audit(run, options)
    fabric = _fabric(run)
    splits = read_data_and_check_weights(run)
    if len(checkpoint["clients"]) != len(splits.clients):
        raise FedPromptError(f"audit {run_dir}: the checkpoint has {len(checkpoint['clients'])} clients but the run's "
                             f"config makes {len(splits.clients)}; audit with the run's own settings.")
    examples = audit_split(splits.clients, options.audit_seed)
    keep = shadow_keep(examples, options.shadows, options.audit_seed)
    pool_splits = FederatedSplits(splits.classnames, audit_clients(splits, examples, keep), splits.source)
    pool_run = _pool_run(run)
    parts = build_parts(fabric, pool_run, pool_splits, quiet=True)
    n = len(splits.clients)
    for cid in range(n):
        parts.pool.states[cid] = checkpoint["clients"][cid]
    batch = run.eval.batch_size
    target = example_scores(parts.pool, list(range(n)), batch)
    loss, phi, correct = (torch.cat([target[k][j] for k in range(n)]) for j in range(3))
    shadows = shadow_federations(fabric, pool_run, parts, options.shadows, options.audit_seed)
    train_shadows(parts.pool, shadows, run.federation.rounds)
    others = shadow_phi(parts.pool, shadows, n, examples, batch) if shadows else torch.zeros((0, len(examples)))
    parts.feed.close()
    members = torch.tensor([e.member for e in examples])
    owners = torch.tensor([e.client for e in examples])
    names = [c.name or f"client{c.client_id}" for c in splits.clients]
    scores = attack_scores(loss, phi, others, keep, options.variance)
    result = {"run": str(run_dir), "method": run.method.name, "round": checkpoint["round"],
              "shadows": options.shadows, "variance": options.variance, "audit_seed": options.audit_seed,
              "accuracy": {"members": float(correct[members].double().mean()),
                           "non_members": float(correct[~members].double().mean())},
              "attacks": figures(scores, members, owners, names), "clients": names}
    tensors = {"client": owners, "member": members, "loss": loss, "phi": phi, "shadow_phi": others, "keep": keep,
               **{f"score/{k}": v for k, v in scores.items()}}
    write_audit(run_dir, result, examples, names, tensors)
    print_audit(result)
    return result


def write_audit(run_dir: Path, result: dict, examples: list[Example], names: list[str], tensors: dict) -> None:
    """``RUN_DIR/audit/``: ``split.json``, ``scores.pt``, then ``result.json`` (each written atomically; the run's
    own files are never touched)."""
    from fedprompt.federation.checkpoint import save_checkpoint
    from fedprompt.files import checked_writes, write_json

    folder = audit_folder(run_dir)
    split = {"clients": [{"client": k, "name": name,
                          "members": [[e.sample.path, e.sample.label] for e in examples if e.client == k and e.member],
                          "non_members": [[e.sample.path, e.sample.label] for e in examples
                                          if e.client == k and not e.member]}
                         for k, name in enumerate(names)]}
    with checked_writes(folder, "the run's own files are unchanged; an earlier audit's files may remain"):
        write_json(folder / "split.json", split)
        save_checkpoint(tensors, folder / "scores.pt")
        write_json(folder / "result.json", result)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_audit(result: dict) -> None:
    """The figures on the console: one line per attack over all clients, then per client."""
    first = result["attacks"]["loss"]["overall"]
    print(f"audit of {result['run']} ({result['method']}, round {result['round']}): {first['members']} members, "
          f"{first['non_members']} non-members, {result['shadows']} shadows; accuracy on members "
          f"{result['accuracy']['members']:.3f}, on non-members {result['accuracy']['non_members']:.3f}")
    print(f"{'attack':<14}{'client':<18}{'AUC':>8}{'TPR@1%':>9}{'TPR@0.1%':>10}")
    for attack, found in result["attacks"].items():
        for who, values in [("all", found["overall"]), *found["clients"].items()]:
            print(f"{attack:<14}{who[:17]:<18}{_cell(values['auc']):>8}{_cell(values['tpr_at_0.01_fpr']):>9}"
                  f"{_cell(values['tpr_at_0.001_fpr']):>10}")
    print(f"-> {audit_folder(Path(result['run']))}")
