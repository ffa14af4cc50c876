"""RNNLanguageModel: token embedding -> stacked LSTM/GRU/tanh-RNN -> linear head.

Training runs the fused ``nn.LSTM``/``nn.GRU``/``nn.RNN`` over whole windows (oneDNN on CPU,
cuDNN on GPU). ``step`` is the one-token path for sampling: the cell equations written out on
weights laid out once for it (the first layer's input projection folded into a lookup table,
one matmul per layer), because a fused RNN call costs far more per token than it computes.
Configs live in ``config.py``; training and sampling loops live elsewhere.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .config import ModelConfig

State = tuple[torch.Tensor, ...]  # LSTM: (h, c); GRU and RNN: (h,), each [num_layers, B, hidden]

_RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# Optimizer steps so far, in this process. A fused optimizer (AdamW(fused=True), the trainer's)
# writes parameters in place without bumping their ``_version``, so the step cache's key counts
# every optimizer step too: a Sampler held across training then sees the new weights.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class RNNLanguageModel(nn.Module):
    """A stacked recurrent language model over token ids.

    Weight tying shares the embedding matrix with the output head. When ``hidden_size`` differs
    from ``embedding_dim``, a bias-free linear projection (hidden -> embedding) sits before the
    tied head, so tying works for any sizes.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.rnn = _RNN_CLASSES[config.cell](
            config.embedding_dim, config.hidden_size, config.num_layers, batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        if config.tie_weights:
            self.projection = (nn.Linear(config.hidden_size, config.embedding_dim, bias=False)
                               if config.hidden_size != config.embedding_dim else nn.Identity())
            self.head = nn.Linear(config.embedding_dim, config.vocab_size)
            self.head.weight = self.embedding.weight
        else:
            self.projection = nn.Identity()
            self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self._init_weights()
        self._step_cache: dict | None = None

    def set_regularisation(self, dropout: float, weight_drop: float) -> None:
        """Change dropout and DropConnect in place (``--preset auto`` sets them once the plan is known);
        neither takes part in building the weights, so the model is the one these values would build."""
        self.config.dropout, self.config.weight_drop = dropout, weight_drop
        self.drop.p = dropout
        self.rnn.dropout = dropout if self.config.num_layers > 1 else 0.0

    def _init_weights(self) -> None:
        nn.init.normal_(self.embedding.weight, std=0.1 if self.config.tie_weights else 1.0)
        hidden, gates = self.config.hidden_size, _GATES[self.config.cell]
        for name, param in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                for block in range(gates):  # orthogonal per gate block
                    nn.init.orthogonal_(param.data[block * hidden:(block + 1) * hidden])
            elif name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param.data)
            elif name.startswith("bias"):
                nn.init.zeros_(param.data)
                if self.config.cell == "lstm" and name.startswith("bias_ih"):
                    param.data[hidden:2 * hidden] = 1.0  # forget gate (gate order i, f, g, o)
        nn.init.zeros_(self.head.bias)
        if not self.config.tie_weights:
            nn.init.normal_(self.head.weight, std=hidden ** -0.5)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        device = device if device is not None else self.embedding.weight.device
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        count = 2 if self.config.cell == "lstm" else 1
        return tuple(torch.zeros(shape, device=device) for _ in range(count))

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids [B, T] -> logits [B, T, V] and the state after the last token."""
        if state is None:
            state = self.init_state(ids.shape[0], ids.device)
        x = self.drop(self.embedding(ids))  # (B, T, E)
        rnn_state = state if self.config.cell == "lstm" else state[0]
        if self.training and self.config.weight_drop:
            out, new_state = self._rnn_weight_dropped(x, rnn_state)  # (B, T, H)
        else:
            out, new_state = self.rnn(x, rnn_state)  # (B, T, H)
        logits = self.head(self.projection(self.drop(out)))  # (B, T, V)
        return logits, (tuple(new_state) if self.config.cell == "lstm" else (new_state,))

    def _rnn_weight_dropped(self, x: torch.Tensor, rnn_state):
        """The fused RNN with DropConnect on its hidden-to-hidden matrices: the weights are masked
        before the call (one mask per window, the same at every time step), so oneDNN and cuDNN
        still run the whole window and the gradient flows to the weights through the mask.

        It calls the op that ``nn.LSTM``/``nn.GRU``/``nn.RNN`` call, on a masked copy of their weight list;
        the module itself is never changed, so evaluation and sampling see the plain weights."""
        rnn, p = self.rnn, self.config.weight_drop
        weights = [F.dropout(w, p, training=True) if name.startswith("weight_hh") else w
                   for name, w in zip(rnn._flat_weights_names, rnn._flat_weights)]
        op = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn": torch._VF.rnn_tanh}[self.config.cell]
        out, *state = op(x, rnn_state, weights, True, rnn.num_layers, rnn.dropout, True, False, True)
        return out, (tuple(state) if self.config.cell == "lstm" else state[0])

    # -------------------------------------------------- one-token path for sampling

    def train(self, mode: bool = True) -> "RNNLanguageModel":
        self._step_cache = None
        return super().train(mode)

    def weights_key(self, params: list[torch.Tensor] | None = None) -> tuple:
        """A key that changes whenever the weights may have: a load, ``.to()``, an in-place write
        or any optimizer step (fused ones included). Copies of the weights check it before use."""
        params = list(self.parameters()) if params is None else params
        return (_optimizer_steps[0],) + tuple((p.data_ptr(), p._version) for p in params)

    def _prepared(self, precision: str = "fp32") -> dict:
        """Weights laid out for ``step``; rebuilt whenever a parameter changes in place or moves.

        Layer 0's input projection of every token, biases included, is precomputed as a table,
        so the first layer costs a lookup instead of a matmul. A higher layer's two matmuls
        become one, over ``[input, h]`` and ``[w_ih | w_hh]`` side by side (for a GRU, for r and
        z only: r scales the hidden part of n on its own). Every op left costs about as much
        as its arithmetic at batch 1, so the layout keeps their number down. LSTM gate
        rows are reordered from torch's (i, f, g, o) to (i, f, o, g), so that one sigmoid and one
        tanh cover all four gates. ``precision="fp16"`` (CPU, x86) stores the recurrent matrices
        as fp16, prepacked for fbgemm, and computes in fp32: half the bytes to read per token,
        which is what bounds batch-1 sampling. Dropout is left out: ``step`` is for eval mode.
        """
        cache = self._step_cache
        if cache is not None:  # a load, an optimizer step or .to() changes a pointer, a version or the count
            if cache["key"] == (precision,) + self.weights_key(cache["params"]):
                return cache
        params = list(self.parameters())  # (replacing a Parameter object needs .train() or .eval() to be seen)
        key = (precision,) + self.weights_key(params)
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"step precision must be fp32 or fp16, got {precision!r}")
        cell, hidden = self.config.cell, self.config.hidden_size

        def reorder(rows: torch.Tensor) -> torch.Tensor:  # LSTM gates (i, f, g, o) -> (i, f, o, g)
            if cell != "lstm":
                return rows
            i, f, g, o = rows.split(hidden, dim=0)
            return torch.cat([i, f, o, g])

        def projection(weight: torch.Tensor, bias: torch.Tensor | None):
            """x [B, in] (+ plus [B, out]) -> x @ weight.T + bias (+ plus): one call."""
            if precision == "fp16":
                packed = torch.ops.quantized.linear_prepack_fp16(weight.contiguous(), bias)
                linear_fp16 = torch.ops.quantized.linear_dynamic_fp16
                return lambda x, plus=None: (linear_fp16(x, packed) if plus is None
                                             else linear_fp16(x, packed).add_(plus))
            weight_t = weight.t()
            if bias is None:
                return lambda x, plus=None: torch.mm(x, weight_t) if plus is None else torch.addmm(plus, x, weight_t)
            return lambda x, plus=None: torch.addmm(bias if plus is None else plus, x, weight_t)

        with torch.no_grad():
            layers = []
            for k in range(self.config.num_layers):
                w_ih, w_hh = getattr(self.rnn, f"weight_ih_l{k}"), getattr(self.rnn, f"weight_hh_l{k}")
                b_ih, b_hh = getattr(self.rnn, f"bias_ih_l{k}"), getattr(self.rnn, f"bias_hh_l{k}")
                if cell == "gru":
                    # r scales only the hidden part of n, so n's two projections stay apart, while
                    # r and z take one sum: (r, z) = [below, h] @ W_rz.T + b_rz. Layer 0's parts
                    # from below are tables, (V, 2H) for r, z (both r, z biases in) and (V, H) for n.
                    rz, n = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
                    if k == 0:
                        table = F.linear(self.embedding.weight, w_ih, b_ih)
                        below_rz = (table[:, rz] + b_hh[rz]).contiguous()
                        layers.append(((below_rz, table[:, n].contiguous()), projection(w_hh[rz], None),
                                       projection(w_hh[n], b_hh[n])))
                    else:
                        layers.append((projection(torch.cat([w_ih[rz], w_hh[rz]], dim=1), b_ih[rz] + b_hh[rz]),
                                       projection(w_ih[n], b_ih[n]), projection(w_hh[n], b_hh[n])))
                elif k == 0:
                    table = reorder(F.linear(self.embedding.weight, w_ih, b_ih + b_hh).t()).t().contiguous()
                    layers.append((table, projection(reorder(w_hh), None)))  # (V, gates*H), h -> gates
                else:
                    w_cat = reorder(torch.cat([w_ih, w_hh], dim=1))  # (gates*H, H_below + H)
                    layers.append((None, projection(w_cat, reorder(b_ih + b_hh))))
            head_w = self.head.weight
            if not isinstance(self.projection, nn.Identity):
                head_w = head_w @ self.projection.weight  # fold the projection: (V, H)
            cache = {"key": key, "params": params, "layers": layers, "head_w_t": head_w.t(),
                     "head_b": self.head.bias}
        self._step_cache = cache
        return cache

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, state: State, precision: str = "fp32") -> tuple[torch.Tensor, State]:
        """One token per stream: ids [B] -> logits [B, V] and the new state (``state`` is not changed).

        The same function as ``forward`` on one token in eval mode, to float rounding (fp32), at
        a fraction of its per-call cost: sampling calls it once per generated token.
        ``precision="fp16"`` reads fp16 copies of the recurrent weights (see ``_prepared``).
        """
        return self._step(self._prepared(precision), ids, state)

    def stepper(self, precision: str = "fp32") -> Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]:
        """``step`` bound to the weights as they are now, for a loop of many steps (a sampler's).

        It skips ``step``'s per-call check that the weights have not changed, so a change made
        while the loop runs is not seen; the caller holds ``torch.inference_mode()``.
        """
        cache = self._prepared(precision)
        return lambda ids, state: self._step(cache, ids, state)

    def _step(self, cache: dict, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        cell, hidden = self.config.cell, self.config.hidden_size
        hs = state[0].unbind(0)  # L x (B, H)
        cs = state[1].unbind(0) if cell == "lstm" else None
        new_h, new_c = [], []
        x = None  # the output of the layer below, (B, H)
        for k, layer in enumerate(cache["layers"]):
            h = hs[k]
            if cell == "gru":
                if k == 0:
                    (table_rz, table_n), project_rz, project_n = layer
                    r, z = project_rz(h, table_rz.index_select(0, ids)).sigmoid().chunk(2, 1)
                    n_below = table_n.index_select(0, ids)
                else:
                    project_rz, project_below_n, project_n = layer
                    r, z = project_rz(torch.cat([x, h], 1)).sigmoid().chunk(2, 1)
                    n_below = project_below_n(x)
                n = torch.addcmul(n_below, r, project_n(h)).tanh()
                x = torch.lerp(n, h, z)  # (1 - z) * n + z * h
            else:
                below, project = layer
                gates = (project(h, below.index_select(0, ids)) if k == 0
                         else project(torch.cat([x, h], 1)))  # (B, gates*H)
                if cell == "lstm":
                    i, f, o = gates[:, :3 * hidden].sigmoid().chunk(3, 1)
                    c = torch.addcmul(f * cs[k], i, gates[:, 3 * hidden:].tanh())
                    x = o * c.tanh()
                    new_c.append(c)
                else:
                    x = gates.tanh()
            new_h.append(x)
        logits = torch.addmm(cache["head_b"], x, cache["head_w_t"])  # (B, V)
        new_state = (torch.stack(new_h),) + ((torch.stack(new_c),) if cell == "lstm" else ())
        return logits, new_state


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)
