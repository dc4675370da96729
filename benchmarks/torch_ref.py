"""PyTorch + transformers reference implementations the benchmarks compare to.

Written for these benchmarks from SPEC §1-3 and the loop the KETCHUP / LLMR
papers describe (sample from the student with `generate`, score the sample
with a teacher-forced teacher pass, turn the teacher's logits into per-token
returns, REINFORCE backward, optimizer step); no code was taken from the
authors' repository.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def k_step_returns(q: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                   k: int) -> torch.Tensor:
  """SPEC §2 K-step returns, a backward loop over positions (batched rows).

      Ĝ_T = Q_T(a_T);  Ĝ_t = Q_t(a_t) - V_{n(t)} + Ĝ_{n(t)},  n(t) = min(t+K, T)

  with T = lengths - 1 per row; positions past T are 0.

  Args:
    q: [B, T] float, Q_t(a_t).
    v: [B, T] float, V_t.
    lengths: [B] int64, real tokens per row (>= 1).
    k: jump length K >= 1.

  Returns:
    [B, T] float Ĝ.
  """
  b_size, t_size = q.shape
  out = torch.zeros_like(q)
  rows = torch.arange(b_size, device=q.device)
  last = lengths - 1
  out[rows, last] = q[rows, last]
  for t in range(t_size - 2, -1, -1):
    live = t < last
    n = torch.clamp(last, max=t + k)
    value = q[:, t] - v[rows, n] + out[rows, n]
    out[:, t] = torch.where(live, value, out[:, t])
  return out


def shift_right(tokens: torch.Tensor, start: int) -> torch.Tensor:
  first = torch.full_like(tokens[:, :1], start)
  return torch.cat([first, tokens[:, :-1]], dim=1)


class _Clock:
  """Splits a step into phases: `clock(name)` stores the seconds since the
  previous mark under `name` (nothing when `timings` is None)."""

  def __init__(self, timings: dict[str, float] | None, device: torch.device):
    self.timings, self.cuda = timings, device.type == "cuda"
    self.last = time.perf_counter()

  def __call__(self, name: str) -> None:
    if self.timings is None:
      return
    if self.cuda:
      torch.cuda.synchronize()
    now = time.perf_counter()
    self.timings[name] = now - self.last
    self.last = now


class RLStep:
  """One KETCHUP step in PyTorch, as the authors' loop is structured.

  The models are either both T5 (`T5ForConditionalGeneration`: the prompt
  is the encoder input, the sample the decoder's) or both decoder-only
  (`*ForCausalLM`: prompt + sample is one sequence, and only the positions
  predicting the sample are projected by the LM head, `logits_to_keep`).

  1. `student.generate` (sampling, no gradient) for `new_tokens` tokens.
  2. Teacher forward on the sample (teacher forcing, no gradient):
     Q_t(a) = logit - mean over the vocabulary, V_t = max_a Q_t(a).
  3. K-step returns (`k_step_returns`), clipped to [-clip, clip].
  4. Student forward on the sample, loss = -sum(A_t log pi(a_t)) / tokens,
     `backward()`.
  5. Global-norm gradient clipping and `torch.optim.AdamW`.

  `timings`, if given, receives the seconds of each phase (perf_counter
  marks; on cuda after a synchronize): generate, teacher (forward + Q and
  values), returns (K-step returns + clipping), student_fwd_bwd (forward,
  log-softmax, loss, backward; zero_grad included), optimizer (gradient
  clipping + AdamW).
  """

  def __init__(self, student, teacher, *, k: int, new_tokens: int,
               learning_rate: float, weight_decay: float, clip: float,
               max_grad_norm: float):
    self.student, self.teacher = student, teacher
    self.k, self.new_tokens, self.clip = k, new_tokens, clip
    self.max_grad_norm = max_grad_norm
    self.optimizer = torch.optim.AdamW(
        student.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
        weight_decay=weight_decay)
    self.decoder_only = not student.config.is_encoder_decoder
    self.start = (None if self.decoder_only else
                  student.config.decoder_start_token_id)

  def _logits(self, model, input_ids: torch.Tensor,
              attention_mask: torch.Tensor, actions: torch.Tensor
              ) -> torch.Tensor:
    """[B, T, V] logits, position t predicting actions[:, t]."""
    if not self.decoder_only:
      return model(input_ids=input_ids, attention_mask=attention_mask,
                   decoder_input_ids=shift_right(actions, self.start)).logits
    t_size = actions.shape[1]
    sequence = torch.cat([input_ids, actions], dim=1)  # [B, S + T]
    mask = torch.cat([attention_mask, torch.ones_like(actions)], dim=1)
    # The last T + 1 positions; the final one predicts past the sample.
    return model(input_ids=sequence, attention_mask=mask,
                 logits_to_keep=t_size + 1).logits[:, :-1]

  def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               timings: dict[str, float] | None = None) -> dict[str, float]:
    clock = _Clock(timings, input_ids.device)
    with torch.no_grad():
      sample = self.student.generate(
          input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
          temperature=1.0, top_k=0, top_p=1.0, num_beams=1,
          max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens)
      clock("generate")
      # [B, T]: without the decoder start token (T5) or the prompt.
      actions = sample[:, input_ids.shape[1] if self.decoder_only else 1:]
      teacher_logits = self._logits(self.teacher, input_ids, attention_mask,
                                    actions).float()  # [B, T, V]
      q_all = teacher_logits - teacher_logits.mean(dim=-1, keepdim=True)
      q_taken = q_all.gather(-1, actions[..., None])[..., 0]
      values = q_all.max(dim=-1).values
      clock("teacher")
      lengths = torch.full((actions.shape[0],), actions.shape[1],
                           dtype=torch.long, device=actions.device)
      returns = k_step_returns(q_taken, values, lengths, self.k)
      advantages = returns.clamp(-self.clip, self.clip)
      clock("returns")
    logits = self._logits(self.student, input_ids, attention_mask, actions)
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_taken = logp.gather(-1, actions[..., None])[..., 0]
    loss = -(advantages * logp_taken).sum() / actions.numel()
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clock("student_fwd_bwd")
    if self.max_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                     self.max_grad_norm)
    self.optimizer.step()
    clock("optimizer")
    return {"loss": float(loss.detach()), "tokens": int(actions.numel())}
