"""The FeDLRT round, FedAvg and FedLin as plain functions over payloads (docs/federated.md).

A round is a short sequence of *stages*. In each stage the :class:`Server` builds
one payload (a ``{key: tensor}`` dict, the same for every participating client),
an engine delivers it, every :class:`Client` answers with its reply payload, and
the server checks the replies and aggregates those that are well formed. The
engine only moves payloads: :func:`run_round` drives the stages over any
``send(stage, payload, clients) -> {client: reply | error text}`` function — the
in-process engine calls the clients directly, the Flower engine
(:mod:`dlrt.federated.flower`) sends Flower Messages.

FeDLRT (``method="fedlrt"``), per matrix layer ``W = U S Vᵀ`` (r×r core):

1. ``basis``: the server sends ``U, S, V`` (and the dense parameters); each client
   returns its basis gradients ``G_c V`` and ``G_cᵀ U`` at that point (one pass over
   its anchor samples) — plus ``Uᵀ G_c V`` for the simplified correction, and the
   dense parameters' gradients for either correction. The server averages them
   (weights: sample counts) and augments the global bases with the shared
   operation :func:`dlrt.linalg.augment_basis`: ``Û = [U | Ū]``, ``V̂ = [V | V̄]``,
   the Galerkin core ``Ŝ⁰ = [[S, 0], [0, 0]]``.
2. ``coef`` (full correction only): the server sends ``Ū, V̄``; each client returns
   its coefficient gradient ``Ûᵀ G_c V̂`` at ``Ŝ⁰``; the server averages them.
3. ``train``: the server sends ``Ū, V̄`` (unless sent in ``coef``) and the global
   gradients the correction needs; each client takes ``local_steps`` SGD steps on
   ``Ŝ`` (and the dense parameters) through the training driver,
   ``Ŝ ← Ŝ − λ (∇ℒ_c(Ŝ) + ∇ℒ(Ŝ⁰) − ∇ℒ_c(Ŝ⁰))``, and returns ``Ŝ_c``. The server
   averages the ``Ŝ_c`` and truncates with the shared rule
   (:func:`dlrt.integrators.base.truncate`).

Corrections: ``full`` corrects the whole ``Ŝ`` with the gradients of stage 2;
``simplified`` corrects only the old ``r×r`` block with ``Uᵀ G V`` from stage 1 (no
extra stage); ``none`` switches the correction off. The dense parameters (biases,
layers left dense) are trained by every client and averaged, with the FedLin
correction unless ``none``. FedAvg sends the dense model, trains it locally and
averages; FedLin adds a ``grad`` stage for the same correction on every weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import linalg
from ..layers import LowRankLayer
from ..layers.tucker import TuckerConv2d

__all__ = [
    "CORRECTIONS",
    "METHODS",
    "Client",
    "CorrectedSGD",
    "RoundRecord",
    "Server",
    "check_reply",
    "dense_state",
    "lowrank_layers",
    "pass_macs",
    "payload_floats",
    "run_round",
    "stages",
]

METHODS = ("fedlrt", "fedavg", "fedlin")
"""The training methods of a federated run: FeDLRT and the FedAvg and FedLin baselines."""
CORRECTIONS = ("full", "simplified", "none")
"""FeDLRT's variance corrections against client drift: full, simplified, or none."""
#: Reply entries that describe the reply (sample count, mean local loss, client multiply-adds), not the model.
META = ("n", "loss", "macs")

Payload = dict[str, Tensor]


def stages(method: str, correction: str) -> tuple[str, ...]:
    """The stages of one round of ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    if method == "fedavg":
        return ("train",)
    if method == "fedlin":
        return ("grad", "train")
    return ("basis", "coef", "train") if correction == "full" else ("basis", "train")


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLayer]:
    """The model's matrix low-rank layers by name (Tucker layers are refused: FeDLRT is defined for matrices)."""
    out: dict[str, LowRankLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, TuckerConv2d):
            raise ValueError(f"layer {name!r} is a Tucker layer; federated training takes matrix layers: conv=matrix")
        if isinstance(module, LowRankLayer):
            out[name] = module
    return out


def dense_state(model: nn.Module) -> dict[str, Tensor]:
    """Every floating-point entry of the model's state that is not a low-rank factor (weights, biases, buffers)."""
    factors = {id(p) for layer in lowrank_layers(model).values() for p in layer.factor_parameters()}
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in factors or not t.is_floating_point():
            continue
        out[name] = params.get(name, t)
    return out


def payload_floats(payload: Mapping[str, Tensor]) -> int:
    """Numbers a payload carries, without the reply's own metadata (:data:`META`)."""
    return sum(t.numel() for k, t in payload.items() if k not in META)


def check_reply(reply: Any, spec: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why ``reply`` is not a well-formed answer to a stage with reply ``spec`` (None: it is)."""
    if not isinstance(reply, Mapping):
        return f"a reply must be a mapping of tensors, got {type(reply).__name__}"
    missing = [k for k in spec if k not in reply]
    if missing:
        return f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
    extra = [k for k in reply if k not in spec]
    if extra:
        return f"unexpected {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}"
    for key, shape in spec.items():
        t = reply[key]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            return f"{key} is not a floating-point tensor"
        if tuple(t.shape) != tuple(shape):
            return f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        if not bool(torch.isfinite(t).all()):
            return f"{key} has non-finite values"
    if not float(reply["n"]) >= 1:
        return f"sample count n={float(reply['n'])} is not positive"
    return None


def _weighted_mean(replies: Mapping[int, Payload], key: str, like: Tensor) -> Tensor:
    """``Σ n_c x_c / Σ n_c`` summed in client order: the result does not depend on the order replies arrived in."""
    total = sum(float(replies[c]["n"]) for c in replies)
    acc = torch.zeros_like(like, dtype=torch.float64)
    for c in sorted(replies):
        acc += replies[c][key].to(device=like.device, dtype=torch.float64) * (float(replies[c]["n"]) / total)
    return acc.to(like.dtype)


# ------------------------------------------------------------------ the server
class Server:
    """The global model and the server's side of every stage (see the module docstring).

    The FeDLRT server truncates with the rule of ``dlrt train`` (``tau``,
    ``tau_mode``): a :class:`~dlrt.DLRTOptimizer` on the global model (plain SGD, so
    it holds no state) carries the rule and the layers' rank bounds, and the shared
    :func:`~dlrt.integrators.base.truncate` operates through it. Under the gradient
    rule the trend of a round is the clients' mean movement of the core,
    ``−(Ŝ − Ŝ⁰)``: the gradient averaged over all their local steps.
    """

    def __init__(
        self, model: nn.Module, *, method: str, correction: str = "full", tau: float = 0.1, tau_mode: str = "gradient"
    ) -> None:
        self.stage_names = stages(method, correction)
        self.method, self.correction = method, correction
        self.model = model
        self.layers = lowrank_layers(model)
        if method == "fedlrt" and not self.layers:
            raise ValueError("method=fedlrt needs a low-rank model (dlrt.convert); this one has no low-rank layer")
        if method != "fedlrt" and self.layers:
            raise ValueError(f"method={method} trains the dense model; this one has low-rank layers (use dense=true)")
        self.dense = dense_state(model)
        self.trainable = {k for k, t in self.dense.items() if isinstance(t, nn.Parameter) and t.requires_grad}
        self.opt = None
        if method == "fedlrt":
            from ..optimizer import DLRTOptimizer

            self.opt = DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=1.0, tau=tau, tau_mode=tau_mode)
        self._gathered: dict[str, Tensor] = {}
        self._saved: dict[str, Any] = {}
        #: True between :meth:`begin` and the round's end (its ``train`` aggregation or :meth:`abort`).
        self.in_round = False

    # -- round bookkeeping
    def begin(self) -> None:
        """Remember the global model, so that a round that cannot complete leaves it as it was."""
        self._gathered = {}
        factors = {n: tuple(p.detach().clone() for p in (ly.U, ly.S, ly.V)) for n, ly in self.layers.items()}
        self._saved = {"factors": factors, "dense": {k: t.detach().clone() for k, t in self.dense.items()}}
        self.in_round = True

    def abort(self) -> None:
        """Put the global model back to where the round began."""
        with torch.no_grad():
            for name, (U, S, V) in self._saved["factors"].items():
                self.layers[name].set_factors(U, S, V)
            for k, t in self._saved["dense"].items():
                self.dense[k].copy_(t)
        self._gathered = {}
        self.in_round = False

    # -- what is sent and what must come back
    def broadcast(self, stage: str) -> Payload:
        out: Payload = {}
        g = self._gathered
        if stage in ("basis", "grad") or (stage == "train" and self.method == "fedavg"):
            out.update({f"w/{k}": t.detach() for k, t in self.dense.items()})
        if stage == "basis":
            for name, ly in self.layers.items():
                out.update({f"U/{name}": ly.U.detach(), f"S/{name}": ly.S.detach(), f"V/{name}": ly.V.detach()})
        if self.method == "fedlrt" and (stage == "coef" or (stage == "train" and self.correction != "full")):
            out.update({k: v for k, v in g.items() if k.startswith(("Ub/", "Vb/"))})
        if stage == "train" and (self.method == "fedlin" or (self.method == "fedlrt" and self.correction != "none")):
            out.update({f"gg/{k}": g[f"g/{k}"] for k in sorted(self.trainable)})
            if self.correction == "simplified":
                out.update({f"ggS/{n}": g[f"gS/{n}"] for n in self.layers})
            elif self.method == "fedlrt":
                out.update({f"ggShat/{n}": g[f"gShat/{n}"] for n in self.layers})
        return out

    def reply_spec(self, stage: str) -> dict[str, tuple[int, ...]]:
        spec: dict[str, tuple[int, ...]] = {k: () for k in META}
        grads = {f"g/{k}": tuple(self.dense[k].shape) for k in sorted(self.trainable)}
        if stage == "grad":
            spec.update(grads)
        elif stage == "basis":
            for name, ly in self.layers.items():
                (n, m), (r_u, r_v) = ly.shape, tuple(ly.S.shape)
                spec.update({f"gK/{name}": (n, r_v), f"gL/{name}": (m, r_u)})  # G V and Gᵀ U
                if self.correction == "simplified":
                    spec[f"gS/{name}"] = (r_u, r_v)
            if self.correction != "none":
                spec.update(grads)
        elif stage == "coef":
            spec.update({f"gShat/{n}": tuple(ly.S.shape) for n, ly in self.layers.items()})
        elif stage == "train":
            spec.update({f"w/{k}": tuple(t.shape) for k, t in self.dense.items()})
            spec.update({f"Shat/{n}": tuple(ly.S.shape) for n, ly in self.layers.items()})
        return spec

    # -- aggregation
    @torch.no_grad()
    def aggregate(self, stage: str, replies: Mapping[int, Payload]) -> None:
        """Fold the (checked) replies of ``stage`` into the server's state; ``train`` ends the round."""
        spec = self.reply_spec(stage)
        mean = {k: _weighted_mean(replies, k, next(iter(replies.values()))[k]) for k in spec if k not in META}
        if stage == "grad":
            self._gathered.update(mean)
        elif stage == "basis":
            self._gathered.update({k: v for k, v in mean.items() if k.startswith(("g/", "gS/"))})
            for name, ly in self.layers.items():
                U0, S0, V0 = ly.U.detach(), ly.S.detach(), ly.V.detach()
                r_u, r_v = S0.shape
                # Û = orth([U₀, G V₀]) with the old columns kept bit for bit: every client rebuilds the same
                # [U₀ | Ū] from the U₀ it holds, and the Galerkin core of W₀ on it is exactly [[S₀, 0], [0, 0]].
                Ub = linalg.augment_basis(U0, mean[f"gK/{name}"].to(U0.dtype))[:, r_u:]
                Vb = linalg.augment_basis(V0, mean[f"gL/{name}"].to(V0.dtype))[:, r_v:]
                self._gathered[f"Ub/{name}"], self._gathered[f"Vb/{name}"] = Ub, Vb
                S_hat = torch.nn.functional.pad(S0, (0, Vb.shape[1], 0, Ub.shape[1]))
                ly.set_factors(torch.cat([U0, Ub], 1), S_hat, torch.cat([V0, Vb], 1))
        elif stage == "coef":
            self._gathered.update(mean)
        elif stage == "train":
            for k, t in self.dense.items():
                t.copy_(mean[f"w/{k}"])
            if self.layers:
                assert self.opt is not None
                for name, ly in self.layers.items():
                    S_hat = mean[f"Shat/{name}"].to(ly.S.dtype)
                    self.opt.trends[ly] = ly.S.detach() - S_hat  # Ŝ⁰ − Ŝ: the round's mean descent direction
                    ly.set_core(S_hat)
                from ..integrators.base import truncate

                try:
                    truncate(self.opt, list(self.layers.values()), self.opt.lowrank_group)
                finally:
                    self.opt.trends = {}
            self._gathered = {}
            self.in_round = False


# ------------------------------------------------------------------ the client
class CorrectedSGD(torch.optim.Optimizer):
    """``p ← p − lr (∇ℒ_c(p) + c_p)``: SGD with a fixed additive correction ``c_p`` per parameter.

    The variance correction ``c_p = ∇ℒ(p⁰) − ∇ℒ_c(p⁰)`` (FedLin, FeDLRT); ``None``
    for a parameter without one. Records the loss of every step in ``losses``.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, corrections: Mapping[int, Tensor | None]) -> None:
        super().__init__(list(params), {"lr": lr})
        self.corrections = dict(corrections)
        self.losses: list[float] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.losses.append(float(loss))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                c = self.corrections.get(id(p))
                d = p.grad if c is None else p.grad + c
                p.add_(d, alpha=-group["lr"])
        return loss


def _positions(model: nn.Module, sample: Tensor) -> dict[str, int]:
    """Output positions per sample (1 for a linear layer, H·W for a convolution) of every weight layer."""
    found: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (LowRankLayer, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):

            def hook(mod: nn.Module, args: Any, out: Tensor, name: str = name) -> None:
                found[name] = out.numel() // (out.shape[0] * out.shape[1]) if out.dim() > 2 else 1

            hooks.append(module.register_forward_hook(hook))
    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(sample[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return found


def pass_macs(model: nn.Module, positions: Mapping[str, int], kind: str) -> int:
    """Multiply-adds of one sample's forward and backward pass of the weight layers.

    ``kind``: ``"dense"`` (every weight trained: ``3F`` for a forward cost ``F``),
    ``"basis"`` (low-rank layers recording ``G V``, ``Gᵀ U`` and ``Uᵀ G V``:
    ``2F + P(n r_v + m r_u + r_u r_v)``) or ``"coef"`` (low-rank layers recording
    only their core gradient: ``2F + P r_u r_v``), with ``F = P(m r_v + r_u r_v + n r_u)``
    the thin forward of an ``n×m`` layer at ``P`` output positions. Activations,
    pooling and the loss are not counted.
    """
    total = 0
    for name, module in model.named_modules():
        P = positions.get(name)
        if P is None:
            continue
        if isinstance(module, LowRankLayer):
            (n, m), (r_u, r_v) = module.shape, tuple(module.S.shape)
            F = P * (m * r_v + r_u * r_v + n * r_u)
            total += 2 * F + P * ((n * r_v + m * r_u + r_u * r_v) if kind == "basis" else r_u * r_v)
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += 3 * P * module.weight.numel()
    return total


class Client:
    """One client's side of every stage: its share of the data and a model to compute on.

    ``model`` may be shared by clients that run one after the other (the in-process
    engine): every stage loads what it needs from the payload and from ``state``,
    the client's memory between the stages of a round (a dict the engine keeps per
    client; Flower keeps it in the node's ``Context.state``).

    ``grad_batches``: the anchor gradients (basis gradients, corrections, FedLin's
    gradient) are means over the first ``grad_batches`` batches of the round's
    seeded order of the client's samples; ``None``: over all its samples (the exact
    local gradient). Local training takes ``local_steps`` steps of the training driver
    (:class:`~dlrt.training.driver.Driver`), its batches in an order seeded by the
    round and the client. ``loss(output, target)`` is the
    batch's mean loss (default: the cross-entropy).
    """

    def __init__(
        self,
        model: nn.Module,
        data: torch.utils.data.TensorDataset,
        *,
        client_id: int,
        method: str,
        correction: str = "full",
        lr: float,
        local_steps: int,
        batch_size: int,
        grad_batches: int | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        stages(method, correction)
        if len(data) < 1:
            raise ValueError(f"client {client_id} has no samples")
        self.model, self.data, self.client_id = model, data, int(client_id)
        self.method, self.correction = method, correction
        self.lr, self.local_steps, self.batch_size = float(lr), int(local_steps), int(batch_size)
        self.grad_batches, self.seed, self.device = grad_batches, int(seed), torch.device(device)
        self.loss = loss or nn.functional.cross_entropy
        # The model's structure never changes (only factor shapes and values): resolve its pieces once.
        self.layers = lowrank_layers(model)
        self.dense = dense_state(model)
        self.trainable = {k: t for k, t in self.dense.items() if isinstance(t, nn.Parameter) and t.requires_grad}
        self._positions: dict[str, int] | None = None

    # -- helpers
    def _seed(self, rnd: int) -> int:
        from ..training.driver import seed_for

        return seed_for(self.seed, rnd, self.client_id)

    def _anchor(self, rnd: int) -> list[tuple[Tensor, Tensor]]:
        x, y = self.data.tensors
        gen = torch.Generator().manual_seed(self._seed(rnd))
        order = torch.randperm(len(y), generator=gen)
        if self.grad_batches is not None:
            order = order[: self.grad_batches * self.batch_size]
        return [(x[i].to(self.device), y[i].to(self.device)) for i in order.split(self.batch_size)]

    def _load(self, payload: Mapping[str, Tensor], state: dict[str, Tensor]) -> None:
        """Put the round's global point into the model (and the client's memory)."""
        with torch.no_grad():
            for k, t in self.dense.items():
                w = payload.get(f"w/{k}", state.get(f"w/{k}"))
                t.copy_(w)
                state[f"w/{k}"] = w.detach().clone()
            for name, ly in self.layers.items():
                U, S, V = (payload.get(f"{f}/{name}", state.get(f"{f}/{name}")) for f in "USV")
                ly.set_factors(U.to(ly.U), S.to(ly.U), V.to(ly.U))
                state.update({f"U/{name}": U, f"S/{name}": S, f"V/{name}": V})

    def _augmented(self, payload: Mapping[str, Tensor], state: dict[str, Tensor]) -> None:
        """Move the model to ``Û = [U | Ū]``, ``Ŝ⁰ = [[S, 0], [0, 0]]``, ``V̂ = [V | V̄]``."""
        layers = self.layers
        missing = [n for n in layers if f"U/{n}" not in state or f"Ub/{n}" not in {**state, **payload}]
        if missing:
            raise ValueError(
                f"client {self.client_id} holds no round-start factors or new directions for {missing[0]!r}: "
                "it did not take part in this round's basis stage (a restarted node), so it sits this round out"
            )
        for name, ly in layers.items():
            Ub = payload.get(f"Ub/{name}", state.get(f"Ub/{name}"))
            Vb = payload.get(f"Vb/{name}", state.get(f"Vb/{name}"))
            state[f"Ub/{name}"], state[f"Vb/{name}"] = Ub, Vb
            U, S, V = state[f"U/{name}"], state[f"S/{name}"], state[f"V/{name}"]
            S_hat = torch.nn.functional.pad(S, (0, Vb.shape[1], 0, Ub.shape[1]))
            ly.set_factors(torch.cat([U, Ub], 1).to(ly.U), S_hat.to(ly.U), torch.cat([V, Vb], 1).to(ly.U))
        with torch.no_grad():
            for k, t in self.dense.items():
                t.copy_(state[f"w/{k}"])

    def _macs(self, kind: str, samples: int) -> float:
        if self._positions is None:
            self._positions = _positions(self.model, self.data.tensors[0][:1].to(self.device))
        return float(pass_macs(self.model, self._positions, kind) * samples)

    def _gradients(self, batches: list[tuple[Tensor, Tensor]], request: frozenset[str] | None) -> float:
        """Mean-loss gradients over ``batches`` into ``.grad`` (and the layers' records); returns the loss."""
        layers = self.layers
        total = sum(len(y) for _, y in batches)
        self.model.zero_grad(set_to_none=True)
        for ly in layers.values():
            ly.clear_pass()
            ly.grad_request = request
        loss_sum = 0.0
        self.model.train()
        for x, y in batches:
            loss = self.loss(self.model(x), y)  # the batch's mean loss
            (loss * (len(y) / total)).backward()
            loss_sum += float(loss.detach()) * len(y)
        return loss_sum / total

    def _reply(self, out: Payload, loss: float, macs: float, samples: int) -> Payload:
        dt = torch.float64
        out = {k: v.detach().clone() for k, v in out.items()}
        out["n"] = torch.tensor(float(samples), dtype=dt)
        out["loss"], out["macs"] = torch.tensor(loss, dtype=dt), torch.tensor(macs, dtype=dt)
        return out

    # -- the stages
    def handle(self, stage: str, payload: Mapping[str, Tensor], state: dict[str, Tensor], rnd: int) -> Payload:
        """The client's reply to ``stage`` of round ``rnd``; ``state`` carries what it needs between stages."""
        samples = len(self.data)
        if stage in ("basis", "grad") or (stage == "train" and self.method == "fedavg"):
            state.clear()
            self._load(payload, state)
        layers = self.layers
        for p in (p for ly in layers.values() for p in ly.bases):
            p.requires_grad_(False)  # a client never moves the bases
        if stage in ("basis", "grad"):
            batches = self._anchor(rnd)
            seen = sum(len(y) for _, y in batches)
            request = frozenset({"K", "L"}) if stage == "basis" else None
            loss = self._gradients(batches, request)
            out: Payload = {}
            for name, ly in layers.items():
                r = ly.S.shape[1]
                gK = ly.grad_K if ly.grad_K is not None else ly.U.new_zeros(ly.U.shape[0], r)
                gL = ly.grad_L if ly.grad_L is not None else ly.V.new_zeros(ly.V.shape[0], ly.S.shape[0])
                out[f"gK/{name}"], out[f"gL/{name}"] = gK, gL
                if self.correction == "simplified":
                    gS = ly.S.grad if ly.S.grad is not None else torch.zeros_like(ly.S)
                    out[f"gS/{name}"] = state[f"gS/{name}"] = gS.detach().clone()
                ly.grad_request = None
                ly.clear_pass()
            if stage == "grad" or self.correction != "none":
                for k, p in self.trainable.items():
                    g = torch.zeros_like(p) if p.grad is None else p.grad
                    out[f"g/{k}"] = state[f"g/{k}"] = g.detach().clone()
            self.model.zero_grad(set_to_none=True)
            return self._reply(out, loss, self._macs("basis" if layers else "dense", seen), samples)
        if stage == "coef":
            self._augmented(payload, state)
            batches = self._anchor(rnd)
            seen = sum(len(y) for _, y in batches)
            loss = self._gradients(batches, frozenset())
            out = {}
            for name, ly in layers.items():
                g = ly.S.grad if ly.S.grad is not None else torch.zeros_like(ly.S)
                out[f"gShat/{name}"] = state[f"gShat/{name}"] = g.detach().clone()
                ly.grad_request = None
            self.model.zero_grad(set_to_none=True)
            return self._reply(out, loss, self._macs("coef", seen), samples)
        if stage != "train":
            raise ValueError(f"unknown stage {stage!r}")
        if self.method == "fedlrt":
            self._augmented(payload, state)
        elif self.method == "fedlin":
            with torch.no_grad():
                for k, t in self.dense.items():
                    t.copy_(state[f"w/{k}"])
        corrections: dict[int, Tensor | None] = {}
        params: list[nn.Parameter] = []
        for k, p in self.trainable.items():
            params.append(p)
            if f"gg/{k}" in payload:
                corrections[id(p)] = payload[f"gg/{k}"].to(p) - state[f"g/{k}"].to(p)
        for name, ly in layers.items():
            params.append(ly.S)
            ly.grad_request = frozenset()  # the backward gives only Ŝ's gradient, from thin products
            if f"ggShat/{name}" in payload:
                corrections[id(ly.S)] = payload[f"ggShat/{name}"].to(ly.S) - state[f"gShat/{name}"].to(ly.S)
            elif f"ggS/{name}" in payload:
                r_u, r_v = state[f"S/{name}"].shape
                c = torch.zeros_like(ly.S)
                c[:r_u, :r_v] = payload[f"ggS/{name}"].to(ly.S) - state[f"gS/{name}"].to(ly.S)
                corrections[id(ly.S)] = c
        opt = CorrectedSGD(params, self.lr, corrections)
        self._drive(opt, rnd)
        for ly in layers.values():
            ly.grad_request = None
            ly.clear_pass()
        out = {f"w/{k}": t for k, t in self.dense.items()}
        out.update({f"Shat/{name}": ly.S for name, ly in layers.items()})
        loss = sum(opt.losses) / max(len(opt.losses), 1)
        macs = self._macs("coef" if layers else "dense", len(opt.losses) * self.batch_size)
        return self._reply(out, loss, macs, samples)

    def _drive(self, opt: CorrectedSGD, rnd: int) -> None:
        """``local_steps`` steps of the training driver on the client's samples (seeded by round and client)."""
        from ..training.driver import Driver, RunWriter, Task

        def forward(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
            x, y = batch
            out = model(x)
            return out, y, self.loss(out, y)

        steps_per_epoch = math.ceil(len(self.data) / self.batch_size)
        driver = Driver(
            Task(self.model, self.data, None, None, forward),
            opt,
            RunWriter(None, [], progress=False),
            device=self.device,
            epochs=math.ceil(self.local_steps / steps_per_epoch),
            batch_size=self.batch_size,
            eval_batch_size=self.batch_size,
            seed=self._seed(rnd),
            max_steps=self.local_steps,
            log_every=self.local_steps,
            ranks=lambda m: {},
        )
        outcome = driver.run()
        if outcome.status == "interrupted":  # the client's steps stopped on a signal: so do the rounds
            raise KeyboardInterrupt(outcome.signal or "")


# ------------------------------------------------------------------ one round
@dataclass
class RoundRecord:
    """What happened in one round: who took part, who dropped or was rejected (and why), and the traffic."""

    round: int
    sampled: list[int]
    completed: bool = True
    failed_stage: str | None = None
    dropped: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    aggregated: list[int] = field(default_factory=list)
    floats_down: dict[int, int] = field(default_factory=dict)
    floats_up: dict[int, int] = field(default_factory=dict)
    macs: dict[int, float] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)


Send = Callable[[str, Payload, list[int]], Mapping[int, "Payload | str"]]


def run_round(
    server: Server, send: Send, participants: Iterable[int], *, rnd: int, min_clients: int = 1
) -> RoundRecord:
    """One round over ``send``: every stage's payload to the clients still in, checked replies aggregated.

    A client that does not answer (an error text instead of a payload) or answers
    with a malformed update (wrong keys or shapes, non-finite values) is logged in
    the record and left out of the rest of the round. When fewer than
    ``min_clients`` well-formed replies arrive in a stage, the round is abandoned
    and the global model restored (``completed=False``).
    """
    active = sorted(set(participants))
    record = RoundRecord(round=rnd, sampled=list(active))
    server.begin()
    for stage in server.stage_names:
        payload = server.broadcast(stage)
        down = payload_floats(payload)
        replies = send(stage, payload, active)
        spec = server.reply_spec(stage)
        accepted: dict[int, Payload] = {}
        for c in active:
            record.floats_down[c] = record.floats_down.get(c, 0) + down
            reply = replies.get(c)
            if reply is None or isinstance(reply, str):
                record.dropped[c] = f"{stage}: {reply or 'no reply'}"
                continue
            record.floats_up[c] = record.floats_up.get(c, 0) + payload_floats(reply)
            problem = check_reply(reply, spec)
            if problem is not None:
                record.rejected[c] = f"{stage}: {problem}"
                continue
            accepted[c] = reply
            record.macs[c] = record.macs.get(c, 0.0) + float(reply["macs"])
            if stage == "train":
                record.losses[c] = float(reply["loss"])
        if len(accepted) < min_clients:
            server.abort()
            record.completed, record.failed_stage = False, stage
            return record
        server.aggregate(stage, accepted)
        active = sorted(accepted)
    record.aggregated = active
    return record
