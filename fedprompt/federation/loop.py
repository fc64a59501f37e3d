"""The round loop, written SPMD over Lightning Fabric ranks.

Every rank holds the backbone once, one client module (whose prompt state is swapped per client) and the state of
every client (prompts are kilobytes). Each round every rank computes the same client sample, trains the clients
placed on it under ``fabric.autocast()``, and the ranks exchange the updated client states (``all_gather_object``).
The aggregator then runs identically on every rank over the uploads in client-id order, so the global state is
bit-identical for any number of processes. Evaluation is spread the same way; rank 0 logs and checkpoints.
Client modules never go through ``fabric.setup`` (DDP would average different clients' gradients).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedprompt.args import EvalArgs, FederationArgs, TrainArgs
from fedprompt.data.base import ClientSplit, ImageDataset
from fedprompt.errors import ClientFailure, FedPromptError
from fedprompt.federation.aggregators import Aggregator, state_bytes
from fedprompt.federation.sampling import derive_seed, place, sample_clients
from fedprompt.methods.base import Method, PromptClient
from fedprompt.metrics import accuracy_metric, base_novel_summary, summarize

State = dict[str, torch.Tensor]


def cpu_state(module: torch.nn.Module) -> State:
    """A detached CPU copy of a module's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def all_gather_objects(fabric, obj) -> list:
    """Every rank's ``obj`` (a list with one entry per rank; ``[obj]`` on a single process)."""
    if fabric.world_size == 1:
        return [obj]
    out = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


@dataclass
class ClientResult:
    """What one client's local round produced."""

    state: State
    upload: State
    loss: float = math.nan
    steps: int = 0
    failure: str | None = None


@dataclass
class Federation:
    """Everything the round loop needs, built once per process by :mod:`fedprompt.fit`."""

    fabric: object
    method: Method
    client: PromptClient
    aggregator: Aggregator
    clients: list[ClientSplit]
    loader: object
    train_transform: object
    test_transform: object
    federation: FederationArgs
    train: TrainArgs
    eval: EvalArgs
    seed: int
    states: dict[int, State] = field(default_factory=dict)
    global_state: State = field(default_factory=dict)
    progress: bool = True
    num_workers: int = 0
    cache: object = None
    novel_client: PromptClient | None = None
    base_test: list = field(default_factory=list)
    novel_test: list = field(default_factory=list)

    def _dataset(self, samples, transform, kind: str):
        cacheable = self.cache is not None and (kind == "test" or not self.train.augment)
        if cacheable:
            return self.cache.dataset(samples, transform, kind)
        return ImageDataset(samples, transform, self.loader)

    # ------------------------------------------------------------------------------------------- local work
    def _loader(self, samples, transform, batch_size, shuffle, kind: str, generator=None) -> DataLoader:
        dataset = self._dataset(samples, transform, kind)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.num_workers)

    def train_client(self, cid: int, round_idx: int) -> tuple[float, int]:
        """Local training of the client whose state is loaded in ``self.client``; returns (mean loss, steps)."""
        fabric, client = self.fabric, self.client
        seed = derive_seed(self.seed, round_idx, cid)
        torch.manual_seed(seed)  # augmentation and any dropout: the same on every rank
        generator = torch.Generator().manual_seed(seed)
        loader = self._loader(self.clients[cid].train, self.train_transform, self.train.batch_size, True, "train",
                              generator)
        optimizer = fabric.setup_optimizers(client.configure_optimizers())
        client.train()
        losses, steps = [], 0
        epochs = self.train.local_epochs if self.train.local_steps is None else 10**9
        for _ in range(epochs):
            for batch in loader:
                batch = fabric.to_device(batch)
                with fabric.autocast():
                    loss = client.training_step(batch, steps)
                if not torch.isfinite(loss):
                    raise ClientFailure(cid, round_idx, f"non-finite loss {float(loss)} at local step {steps}")
                fabric.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                steps += 1
                if self.train.local_steps is not None and steps >= self.train.local_steps:
                    break
            if self.train.local_steps is not None and steps >= self.train.local_steps:
                break
        mean_loss = float(torch.stack(losses).mean()) if losses else math.nan
        return mean_loss, steps

    @torch.no_grad()
    def evaluate_client(self, samples, client: PromptClient | None = None) -> float:
        """Accuracy of the loaded client (or of ``client``) on ``samples``."""
        if not samples:
            return math.nan
        client = client or self.client
        client.eval()
        metric = accuracy_metric(len(client.classnames)).to(self.fabric.device)
        for batch in self._loader(samples, self.test_transform, self.eval.batch_size, False, "test"):
            batch = self.fabric.to_device(batch)
            with self.fabric.autocast():
                logits = client.predict_logits(batch)
            metric.update(logits.float(), batch["label"])
        return float(metric.compute())

    def _load(self, cid: int) -> None:
        self.client.load_state_dict(self.states[cid])

    # ------------------------------------------------------------------------------------------------ round
    def run_client(self, cid: int, round_idx: int) -> ClientResult:
        """Load client ``cid``, train it locally, return its new state and upload (failures are captured)."""
        self._load(cid)
        self.client.on_round_start(self.global_state or None)
        loss, steps, failure = math.nan, 0, None
        if self.method.trains:
            try:
                loss, steps = self.train_client(cid, round_idx)
            except ClientFailure as err:
                failure = err.reason
            except FedPromptError:
                raise
            except Exception as err:  # reported with the client id, never silently dropped
                failure = f"{type(err).__name__}: {err}"
        state = cpu_state(self.client)
        upload = self.aggregator.upload(cid, state, round_idx) if failure is None else {}
        return ClientResult(state, upload, loss, steps, failure)

    def run_round(self, round_idx: int) -> dict:
        """One communication round; returns the metrics row (without evaluation)."""
        start = time.perf_counter()
        fabric = self.fabric
        sampled = sample_clients(len(self.clients), self.federation.fraction, self.seed, round_idx,
                                 everyone=round_idx == 1 and self.federation.all_clients_first_round)
        bytes_down = sum(state_bytes(self.aggregator.download(self.global_state, cid)) for cid in sampled) \
            if self.global_state else 0
        mine = place(sampled, fabric.global_rank, fabric.world_size)
        bar = tqdm(mine, desc=f"round {round_idx} clients", leave=False, disable=not self.progress)
        local = {cid: self.run_client(cid, round_idx) for cid in bar}
        results: dict[int, ClientResult] = {}
        for part in all_gather_objects(fabric, local):
            results.update(part)
        failed = {cid: r.failure for cid, r in sorted(results.items()) if r.failure}
        if failed and self.federation.on_client_failure == "raise":
            details = "; ".join(f"client {c}: {why}" for c, why in failed.items())
            raise FedPromptError(f"round {round_idx}: {details}. The last checkpoint holds the previous round; "
                                 "lower the learning rate or use --federation.on_client_failure skip.")
        ok = [cid for cid in sorted(results) if cid not in failed]
        for cid in ok:
            self.states[cid] = results[cid].state
        uploads = {cid: results[cid].upload for cid in ok}
        if self.method.communicates and ok:
            weights = {cid: len(self.clients[cid].train) for cid in ok}
            self.global_state = self.aggregator.aggregate(uploads, weights, round_idx)
            for cid in self.states:
                received = self.aggregator.download(self.global_state, cid)
                self.states[cid] = self.aggregator.apply(self.states[cid], received, cid)
        losses = [results[cid].loss for cid in ok if not math.isnan(results[cid].loss)]
        row = {"round": round_idx, "train_loss": sum(losses) / len(losses) if losses else None,
               "clients": sampled, "bytes_up": sum(state_bytes(u) for u in uploads.values()),
               "bytes_down": bytes_down}
        if failed:
            row["failed_clients"] = {str(c): why for c, why in failed.items()}
        row["train_seconds"] = time.perf_counter() - start
        return row

    def evaluate_all(self) -> dict:
        """Every client's accuracy on its own test data, spread over ranks; returns the summary metrics."""
        ids = list(range(len(self.clients)))
        local = {}
        for cid in tqdm(place(ids, self.fabric.global_rank, self.fabric.world_size), desc="evaluating",
                        leave=False, disable=not self.progress):
            self._load(cid)
            local[cid] = (self.evaluate_client(self.clients[cid].test), self.evaluate_client(self.clients[cid].val),
                          *self._base_novel(cid))
        results: dict[int, tuple] = {}
        for part in all_gather_objects(self.fabric, local):
            results.update(part)
        accs = {cid: r[0] for cid, r in results.items()}
        counts = {cid: len(self.clients[cid].test) for cid in ids}
        valid = {cid: a for cid, a in accs.items() if not math.isnan(a)}
        out = summarize(valid, counts, self.method.global_model)
        out["client_acc"] = [accs[cid] for cid in ids]
        val = [results[cid][1] for cid in ids if not math.isnan(results[cid][1])]
        if val:
            out["val_acc"] = sum(val) / len(val)
        if self.novel_client is not None:
            out.update(base_novel_summary(out["local_acc"], [results[cid][2] for cid in ids],
                                          [results[cid][3] for cid in ids]))
        return out

    def _base_novel(self, cid: int) -> tuple[float, ...]:
        """The loaded client's accuracy on the whole base test set and, rebuilt on the novel class names with the
        same prompt state, on the whole novel test set (empty without a base-to-novel split)."""
        if self.novel_client is None:
            return ()
        self.novel_client.load_state_dict(self.states[cid])
        return self.evaluate_client(self.base_test), self.evaluate_client(self.novel_test, self.novel_client)

    def initial_states(self) -> None:
        """Every client starts from the same initial prompt state (the server's initialisation)."""
        init = cpu_state(self.client)
        self.states = {cid: {k: v.clone() for k, v in init.items()} for cid in range(len(self.clients))}
        if self.method.communicates:
            self.global_state = self.aggregator.upload(-1, init, 0)
