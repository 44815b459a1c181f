"""Expert parallelism: token dispatch to the devices that own their experts, in `jax.shard_map`.

Tokens are split over the batch axes (`data`, `fsdp`, `expert`) and `context` (each row's
positions, context parallelism); expert weights [E, ...] are split
over `expert`, so each device owns E_loc = E / |expert| experts. Three strategies
(`model.expert_dispatch`):

- "allgather": all-gather the tokens of the expert group, each device runs its local experts on
  all of them (dropless), reduce-scatter the partial outputs back. Works on every backend; exact.
- "all_to_all": each device packs its assignments per destination device into a [P, C, D]
  buffer, `all_to_all` sends them to the expert owners, which run their experts and send the
  results back. C is ceil(n*k/P * capacity_factor), and overflowing assignments are dropped and
  counted; dropless (capacity_factor None) see `_dropless`.
- "ragged_all_to_all": assignments sorted by destination are exchanged with
  `jax.lax.ragged_all_to_all`, so only the rows actually routed travel (no per-destination
  padding). The receive buffer holds ceil(n*k * capacity_factor) rows, shared among the senders
  in device order; rows that do not fit are dropped and counted; dropless see `_dropless`.
  XLA:CPU has no ragged all-to-all, so on CPU the same offsets drive an emulation built from a
  dense `all_to_all` (`ragged_exchange`); the native op is used on GPU and TPU.

Dropless exchanges (capacity_factor None) size their buffers by `model.dropless_fast_factor` x
the mean load and run over the fewest token slices that fit them (`_dropless`). Each strategy
returns the combined routed-expert output for the local tokens and the number of dropped
assignments (summed over the mesh). Results equal the single-device computation up to float
summation order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax.axes import batch_axes, splitting, token_axes
from r1jax.model.config import ModelConfig
from r1jax.model.moe.experts import combine_sorted, routed_experts, sorted_rows

EXPERT_KEYS = ("gate", "up", "down")
FAST_MIN_MEAN = 16  # mean rows per (source, destination) pair below which `_dropless` runs exact


def _allgather_local(p, x, w, ids, cfg: ModelConfig, ep: int, tokens_sharded: bool):
  E_loc = p["gate"].shape[0]
  gather = ep > 1 and tokens_sharded
  if gather:
    x, w, ids = (jax.lax.all_gather(a, "expert", tiled=True) for a in (x, w, ids))
  offset = jax.lax.axis_index("expert") * E_loc if ep > 1 else 0
  local = ids - offset
  valid = (local >= 0) & (local < E_loc)
  y, dropped = routed_experts(p, x, jnp.where(valid, w, 0.0),
                                      jnp.where(valid, local, E_loc), cfg)
  if gather:
    y = jax.lax.psum_scatter(y, "expert", tiled=True)
  elif ep > 1:
    y = jax.lax.psum(y, "expert")
  return y, dropped


def _all_to_all_local(p, x, w, ids, cfg: ModelConfig, ep: int, C: int):
  """The all_to_all exchange with C rows per (source, destination) pair."""
  n, D = x.shape
  k = ids.shape[1]
  E_loc = p["gate"].shape[0]
  A = n * k
  dest = (ids // E_loc).reshape(-1)  # ep for masked tokens (id E): sent nowhere
  order = jnp.argsort(dest, stable=True)
  counts = jnp.bincount(dest, length=ep + 1)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.zeros((A,), jnp.int32).at[order].set(
      (jnp.arange(A) - starts[dest[order]]).astype(jnp.int32))
  # assignment j is token j // k: x repeated k times (its gradient is a sum over k, not a
  # scatter-add, so it is deterministic on a GPU too)
  send_x = jnp.zeros((ep, C, D), x.dtype).at[dest, rank].set(jnp.repeat(x, k, axis=0),
                                                             mode="drop")
  send_id = jnp.full((ep, C), E_loc, jnp.int32).at[dest, rank].set(
      (ids % E_loc).reshape(-1), mode="drop")
  recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
  recv_id = jax.lax.all_to_all(send_id, "expert", 0, 0, tiled=True)
  # each received row goes to exactly one local expert, with unit weight
  cfg1 = dataclasses.replace(cfg, num_experts_per_tok=1, n_routed_experts=E_loc)
  y2, dropped2 = routed_experts(p, recv_x.reshape(ep * C, D),
                                        jnp.ones((ep * C, 1), jnp.float32),
                                        recv_id.reshape(ep * C, 1), cfg1)
  back = jax.lax.all_to_all(y2.reshape(ep, C, D), "expert", 0, 0, tiled=True)
  y_assign = back.at[dest, rank].get(mode="fill", fill_value=0)  # [A, D]; dropped read 0
  y = (y_assign * w.reshape(-1)[:, None]).reshape(n, k, D).sum(1)
  dropped = jnp.sum((rank >= C) & (dest < ep)).astype(jnp.float32) + dropped2
  return y, dropped


def _exclusive_cumsum(a, axis):
  return jnp.cumsum(a, axis=axis) - a


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                    axis_name: str, native: bool | None = None):
  """`jax.lax.ragged_all_to_all` (same contract), or on CPU an emulation with a dense all_to_all.

  Device i sends operand[input_offsets[j] : + send_sizes[j]] to device j, where it is written at
  output[output_offsets[j] : + ...] (offsets in the receiver's buffer); recv_sizes[j] rows arrive
  from device j. The emulation pads each chunk to the operand's length, so it costs P times the
  memory of the native op; it exists so the dispatch logic runs (and is tested) on CPU.
  """
  if native is None:
    native = jax.default_backend() != "cpu"
  if native:
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis_name)
  A = operand.shape[0]
  R = output.shape[0]
  r = jnp.arange(A)
  rows = input_offsets[:, None] + r[None, :]                                  # [P, A]
  valid = r[None, :] < send_sizes[:, None]
  chunks = jnp.where(valid.reshape(valid.shape + (1,) * (operand.ndim - 1)),
                     operand[jnp.clip(rows, 0, A - 1)], 0)                     # [P, A, ...]
  got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)               # [P(src), A, ...]
  at = jax.lax.all_to_all(output_offsets[:, None], axis_name, 0, 0, tiled=True)[:, 0]
  dest = jnp.where(r[None, :] < recv_sizes[:, None], at[:, None] + r[None, :], R)
  return output.at[dest.reshape(-1)].set(got.reshape((-1,) + operand.shape[1:]), mode="drop")


def _ragged_local(p, x, w, ids, cfg: ModelConfig, ep: int, native: bool | None, R: int):
  """The ragged exchange into an R-row receive buffer."""
  n, D = x.shape
  k = ids.shape[1]
  E_loc = p["gate"].shape[0]
  A = n * k
  me = jax.lax.axis_index("expert")
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)            # by destination device, then local expert
  counts_e = jnp.bincount(flat, length=ep * E_loc).reshape(ep, E_loc)  # mine, per dest expert
  all_e = jax.lax.all_gather(counts_e, "expert")    # [src, dst, E_loc]
  counts = all_e.sum(-1)                            # [src, dst] assignments
  # receiver r takes senders in device order until its R rows are full
  room = jnp.maximum(R - _exclusive_cumsum(counts, 0), 0)
  allowed = jnp.minimum(counts, room)               # [src, dst] rows actually sent
  send_off = _exclusive_cumsum(counts, 1)           # sender's chunk starts in its sorted rows
  recv_off = _exclusive_cumsum(allowed, 0)          # chunk starts in the receiver's buffer
  sorted_x = sorted_rows(x, order, k)
  recv_x = ragged_exchange(sorted_x, jnp.zeros((R, D), x.dtype), send_off[me], allowed[me],
                           recv_off[me], allowed[:, me], "expert", native)
  # the local expert of every received row follows from the senders' per-expert counts
  row = jnp.arange(R)
  src = jnp.clip(jnp.searchsorted(recv_off[:, me], row, side="right") - 1, 0, ep - 1)
  within = row - recv_off[src, me]
  bounds = jnp.cumsum(all_e[:, me, :], axis=-1)     # [src, E_loc]
  expert = jnp.sum(within[:, None] >= bounds[src], axis=-1)
  expert = jnp.where(within < allowed[src, me], expert, E_loc)
  # the receive buffer is the only capacity limit: no second drop per local expert
  cfg1 = dataclasses.replace(cfg, num_experts_per_tok=1, n_routed_experts=E_loc,
                             capacity_factor=None)
  y_recv, dropped2 = routed_experts(p, recv_x, jnp.ones((R, 1), jnp.float32),
                                            expert[:, None], cfg1)
  y_sorted = ragged_exchange(y_recv, jnp.zeros((A, D), y_recv.dtype), recv_off[:, me],
                             allowed[:, me], send_off[:, me], allowed[me], "expert", native)
  # sorted row i is assignment order[i] of token order[i] // k; unsent rows came back as 0
  y = combine_sorted(y_sorted * w.reshape(-1)[order][:, None], order, n, k)
  dropped = jnp.sum(counts[me] - allowed[me]).astype(jnp.float32) + dropped2
  return y, dropped


def _chunked(run, x, w, ids, chunks: int, no_expert: int):
  """run(x, w, ids) -> (y, dropped) over `chunks` consecutive slices of the local tokens, one
  after another (`lax.map`, each slice rematerialized in the backward pass), so only one slice's
  buffers are live at a time. Tokens are independent in the routed experts, so this equals one
  call on all of them. The last slice is padded with tokens routed nowhere (id `no_expert`)."""
  n, D = x.shape
  nc = -(-n // chunks)
  pad = nc * chunks - n
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    w = jnp.pad(w, ((0, pad), (0, 0)))
    ids = jnp.pad(ids, ((0, pad), (0, 0)), constant_values=no_expert)
  split = lambda a: a.reshape((chunks, nc) + a.shape[1:])
  ys, dropped = jax.lax.map(jax.checkpoint(lambda a: run(*a)), (split(x), split(w), split(ids)))
  return ys.reshape(chunks * nc, D)[:n], dropped.sum()


def _slice_loads(dest, n: int, k: int, ep: int, slices: int):
  """The rows each slice of `slices` consecutive token slices sends to each device: [slices,
  ep] (the last slice holds what is left when slices does not divide n)."""
  nc = -(-n // slices)
  which = jnp.arange(n * k) // (nc * k)  # assignment j belongs to token j // k
  return jnp.zeros((slices, ep + 1), jnp.int32).at[which, dest].add(1)[:, :ep]


def has_fast_buffers(cfg: ModelConfig) -> bool:
  """Whether a dropless exchange between devices runs fast buffers that the routing can
  overflow into token slices (`_dropless`; the metric `moe_exchange_rounds` counts them; in a
  shared-prefix forward it is the mean over both passes)."""
  return (cfg.is_moe and cfg.capacity_factor is None and bool(cfg.dropless_fast_factor)
          and cfg.expert_dispatch != "allgather")


def _dropless(p, x, w, ids, cfg: ModelConfig, ep: int, strategy: str, native: bool | None,
              token_axes):
  """A dropless exchange (capacity_factor None) whose buffers do not have to hold the worst case.

  A token's k experts are distinct, so one device sends at most n * min(k, E_loc) rows to one
  other device: that is the exact bound per (source, destination) pair for "all_to_all", and
  ep times it is the receive buffer of "ragged_all_to_all". Both are ep / min(k, E_loc) times
  the mean load, which at DeepSeek-V3's scale (ep 64, E_loc 4, k 8) is 16x more memory than
  the routing ever uses. With `cfg.dropless_fast_factor` f, the buffers hold f x the mean load
  (ceil(n*k/ep * f) rows per pair, or ceil(n*k * f) received rows), and the exchange runs over
  the fewest consecutive token slices (1, 2, 4, ... up to S) whose every slice fits them
  anywhere in the mesh: each device counts its slices' loads, and one pmin makes the choice the
  same on every device. S slices are small enough that each one's exact bound fits, so some
  choice always does. Tokens are independent in the routed experts, so the output is the same
  for any choice, and nothing is dropped; an overflow costs one more exchange per slice.
  Below FAST_MIN_MEAN rows per pair on average (decode steps), the counts vary too much for the
  fast buffers to hold them often, and the exact buffers are small: those run exact.
  With `cfg.dropless_max_tokens` M, n > M tokens always exchange in at least ceil(n / M)
  slices (the ladder starts there), and every buffer is sized for one slice: a long row's
  exchange takes the memory of an M-token one.
  Returns (y, dropped, slices): the number of exchanges that ran one after another."""
  n, k = ids.shape
  E_loc = p["gate"].shape[0]
  per_pair = min(k, E_loc)
  f = cfg.dropless_fast_factor
  least = -(-n // cfg.dropless_max_tokens) if cfg.dropless_max_tokens else 1
  n_least = -(-n // least)  # tokens per slice of the fewest slices
  if strategy == "all_to_all":
    run = lambda rows: lambda *a: _all_to_all_local(p, *a, cfg, ep, rows)
    exact = lambda tokens: tokens * per_pair
    fast = math.ceil(n_least * k / ep * f) if f else 0
    load = lambda sent: jnp.max(sent, axis=-1)  # the fullest pair of each slice
  else:
    run = lambda rows: lambda *a: _ragged_local(p, *a, cfg, ep, native, rows)
    exact = lambda tokens: ep * tokens * per_pair
    fast = math.ceil(n_least * k * f) if f else 0
    load = lambda sent: jnp.max(jax.lax.psum(sent, "expert"), axis=-1)  # fullest receiver
  rounds = lambda s: jnp.full((), s, jnp.float32)
  if not fast or fast >= exact(n_least) or n_least * k / ep < FAST_MIN_MEAN:
    if least == 1:
      return run(exact(n))(x, w, ids) + (rounds(1),)
    return _chunked(run(exact(n_least)), x, w, ids, least, no_expert=ep * E_loc) + (rounds(least),)
  # slices whose exact bound (about) fits `fast`
  most = min(n, least * -(-exact(n_least) // fast))
  ladder = [least * 2 ** i for i in range((most // least).bit_length()) if least * 2 ** i < most]
  ladder += [most]
  dest = (ids // E_loc).reshape(-1)  # ep for tokens routed nowhere
  fits = jnp.stack([jnp.max(load(_slice_loads(dest, n, k, ep, s))) <= fast for s in ladder[:-1]]
                   + [jnp.bool_(True)])
  choice = jnp.argmax(jax.lax.pmin(fits.astype(jnp.int32), token_axes))  # first fit everywhere

  def branch(s):
    rows = fast if s < most else max(fast, exact(-(-n // s)))
    if s == 1:
      return lambda: run(rows)(x, w, ids)
    return lambda: _chunked(run(rows), x, w, ids, s, no_expert=ep * E_loc)

  y, dropped = jax.lax.switch(choice, [branch(s) for s in ladder])
  return y, dropped, jnp.asarray(ladder, jnp.float32)[choice]


def dispatch(p, x_ND, weights_Nk, ids_Nk, cfg: ModelConfig, mesh, native: bool | None = None):
  """Routed-expert output [N, D] fp32, the dropped-assignment count, and the number of expert
  exchanges that ran one after another (1 but where a dropless exchange's routing overflowed
  its fast buffers: `_dropless`), on a mesh.

  `native` (ragged_all_to_all only): None picks the native collective off CPU."""
  # tokens [B * T] split over the batch axes and `context` (rows, then positions); where the
  # context devices cannot split them, over the batch axes alone
  bax = splitting(mesh, x_ND.shape[0], token_axes(mesh), batch_axes(mesh))
  tokens_sharded = bool(bax)
  ep = mesh.shape.get("expert", 1)
  if ep > 1 and p["gate"].shape[0] % ep:
    ep = 1  # experts not divisible: replicate them (only for toy configs)
  tok = P(bax) if tokens_sharded else P()
  exp = P("expert") if ep > 1 else P()
  strategy = cfg.expert_dispatch
  if strategy in ("all_to_all", "ragged_all_to_all") and not (tokens_sharded and ep > 1 and "expert" in bax):
    strategy = "allgather"  # nothing to exchange: tokens are already where the experts are

  def local(pe, x, w, ids):
    A = ids.size
    cf = cfg.capacity_factor
    rounds = jnp.ones((), jnp.float32)
    if strategy != "allgather" and cf is None:
      y, dropped, rounds = _dropless(pe, x, w, ids, cfg, ep, strategy, native, bax)
    elif strategy == "all_to_all":
      y, dropped = _all_to_all_local(pe, x, w, ids, cfg, ep, min(A, math.ceil(A / ep * cf)))
    elif strategy == "ragged_all_to_all":
      y, dropped = _ragged_local(pe, x, w, ids, cfg, ep, native, min(ep * A, math.ceil(A * cf)))
    else:
      y, dropped = _allgather_local(pe, x, w, ids, cfg, ep, tokens_sharded)
    # every device counted drops among distinct (token, expert) pairs of its own
    red = bax if tokens_sharded else (("expert",) if ep > 1 else ())
    return y, (jax.lax.psum(dropped, red) if red else dropped), rounds  # the same on all

  pe = {key: p[key] for key in EXPERT_KEYS}
  fn = jax.shard_map(local, mesh=mesh, in_specs=({key: exp for key in EXPERT_KEYS}, tok, tok, tok),
                     out_specs=(tok, P(), P()), check_vma=False)
  return fn(pe, x_ND, weights_Nk, ids_Nk)
