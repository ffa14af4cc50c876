"""RNNLanguageModel: token embedding -> stacked LSTM/GRU/tanh-RNN -> linear head.

Training runs the fused ``nn.LSTM``/``nn.GRU``/``nn.RNN`` over whole windows (oneDNN on CPU,
cuDNN on GPU). ``step`` is the one-token path for sampling: it calls the fused cell kernels on
the same weights, with the first layer's input projection folded into a lookup table.
Configs live in ``config.py``; training and sampling loops live elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

State = tuple[torch.Tensor, ...]  # LSTM: (h, c); GRU and RNN: (h,), each [num_layers, B, hidden]

_RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
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
        out, new_state = self.rnn(x, rnn_state)  # (B, T, H)
        logits = self.head(self.projection(self.drop(out)))  # (B, T, V)
        return logits, (tuple(new_state) if self.config.cell == "lstm" else (new_state,))

    # -------------------------------------------------- one-token path for sampling

    def train(self, mode: bool = True) -> "RNNLanguageModel":
        self._step_cache = None
        return super().train(mode)

    def _prepared(self) -> dict:
        """Weights laid out for ``step``; rebuilt whenever the model changes mode."""
        if self._step_cache is None:
            layers = []
            for k in range(self.config.num_layers):
                w_ih = getattr(self.rnn, f"weight_ih_l{k}")
                layers.append((w_ih, getattr(self.rnn, f"weight_hh_l{k}"),
                               getattr(self.rnn, f"bias_ih_l{k}"), getattr(self.rnn, f"bias_hh_l{k}")))
            # layer 0's input projection of every token, precomputed: a lookup instead of a matmul
            table = F.linear(self.embedding.weight, layers[0][0], layers[0][2])  # (V, gates*H)
            head_w = self.head.weight
            if not isinstance(self.projection, nn.Identity):
                head_w = head_w @ self.projection.weight  # fold the projection: (V, H)
            self._step_cache = {"layers": layers, "table": table.detach(), "head_w": head_w.detach(),
                                "head_b": self.head.bias.detach()}
        return self._step_cache

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token per stream, in eval mode: ids [B] -> logits [B, V] and the new state."""
        cache = self._prepared()
        cell = self.config.cell
        hs, cs = list(state[0].unbind(0)), (list(state[1].unbind(0)) if cell == "lstm" else None)
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(cache["layers"]):
            if k == 0:
                gates_in = cache["table"][ids]  # (B, gates*H), bias included
                w_ih, b_ih = None, None
            if cell == "lstm":
                gates = (gates_in if k == 0 else F.linear(hs[k - 1], w_ih, b_ih)) + F.linear(hs[k], w_hh, b_hh)
                i, f, g, o = gates.chunk(4, 1)
                c = torch.sigmoid(f) * cs[k] + torch.sigmoid(i) * torch.tanh(g)
                hs[k], cs[k] = torch.sigmoid(o) * torch.tanh(c), c
            elif cell == "gru":
                gi = gates_in if k == 0 else F.linear(hs[k - 1], w_ih, b_ih)
                gh = F.linear(hs[k], w_hh, b_hh)
                ir, iz, inn = gi.chunk(3, 1)
                hr, hz, hn = gh.chunk(3, 1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                n = torch.tanh(inn + r * hn)
                hs[k] = n + z * (hs[k] - n)
            else:
                gi = gates_in if k == 0 else F.linear(hs[k - 1], w_ih, b_ih)
                hs[k] = torch.tanh(gi + F.linear(hs[k], w_hh, b_hh))
        logits = F.linear(hs[-1], cache["head_w"], cache["head_b"])  # (B, V)
        new_state = (torch.stack(hs),) + ((torch.stack(cs),) if cell == "lstm" else ())
        return logits, new_state


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)
