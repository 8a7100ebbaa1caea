"""SuperDiff: superposing diffusion models with the Itô density estimator (pure maths, no ComfyUI).

Skreta, Atanackovic, Bose, Tong, Neklyudov, "The Superposition of Diffusion Models Using the Itô Density
Estimator", ICLR 2025 (arXiv 2412.17762). N components (models, or prompts on one model) are sampled *together*
with one reverse SDE whose drift is a per-sample κ-mixture of their scores, while the log-density of the sample
under every component is tracked along the way (Thm. 1). κ then realises one of two operations:

- **OR** (mixture of densities, Prop. 4 / eq. 15): κ = softmax(T · log q + bias), the paper's Algorithm 1 form.
  With T = 1 and bias = log ω the sampler draws from Σ ω_i q^i. The authors' script computes
  softmax(T · (log q + bias)) instead; the two agree at T = 1 only.
- **AND** (equal densities, Prop. 6 / App. C.1): κ with Σκ = 1 chosen at every step so that every component's
  log-density changes by the same amount — the (N+1)×(N+1) linear system of App. C.1, solved per sample
  *after* the step's noise has been drawn (the noise is part of the density increment).

Parameterisation. Everything is written in ComfyUI's σ: a sample at noise level σ is x = α(σ) x₀ + σ ε with

- ``ve`` — ε- and v-prediction models (SD1.x, SD2, SDXL; k-diffusion's space): α = 1;
- ``flow`` — rectified-flow models (SD3, Flux, Wan: ComfyUI's CONST): α = 1 − σ.

σ itself is the SDE's clock. With a = d log α/dσ, the forward SDE of Prop. 2 has drift f = a·x and diffusion
g² = 2σ²(1/σ − a). A reverse step from σ to σ' < σ (Δ = σ − σ' > 0) is one Euler–Maruyama step of the reverse
SDE with ξ = g²/2 (Prop. 1), coefficients taken at the step's start (left point, as in the authors' SD code)::

    x' = x + Δ·(−a·x + g²·Σ_j κ_j ŝ_j) + √(g²Δ)·z                      z ~ N(0, I)
    Δlog q^i = ⟨x' − x, s_i⟩ + Δ·[D·a + ⟨a·x − (g²/2)·s_i, s_i⟩]        (Thm. 1, D = dimensions)

where s_i is component i's *unguided* score (its positive prompt) and ŝ_j its guided (CFG) score, which only
drives the sample (``docs/methods.md``, SuperDiff note 3). Scores come from denoised predictions:
∇log q = (α·D(x, σ) − x)/σ². For VE this is the authors' update Δlog q = −⟨dx, ε⟩/σ − |Δσ|·‖ε‖²/σ; note the
**minus** on the ‖ε‖² term — their OR branch has it flipped, which biases each estimate by hundreds of nats
(``docs/methods.md``, SuperDiff note 1). Thm. 1 is used for both operations here. Because Σκ = 1, the
a·⟨x, s_i⟩ terms cancel and the increment is affine in κ::

    Δlog q^i = Σ_j A_ij κ_j + b_i,   A_ij = g²Δ·⟨s_i, ŝ_j⟩,   b_i = √(g²Δ)·⟨z, s_i⟩ + Δ·(D·a − (g²/2)·‖s_i‖²)

which is what AND solves and what every update uses (one pass over the latents per step).

The estimator holds only for this SDE — its noise must have exactly the forward g. A deterministic (ODE)
sampler would need the divergence of every network (Prop. 5), so :func:`step_coefficients` refuses steps
without noise. Flow models have α = 0 and g² = ∞ at σ = 1: schedules that start at σ ≥ ``flow_sigma_max``
start at their first σ below it instead (:func:`start_schedule`, :func:`restart_flow`).

Numerics: per-sample log-densities are sums over 10⁴–10⁵ latent dimensions, so all per-sample scalars (inner
products, κ, the accumulated log-densities) are kept in float64 where the device has it (float32 elsewhere),
softmax subtracts the maximum, and the per-sample systems are solved batched.

Speed: a step never reads a value back from the device (no ``.item()``, no host-side branch on a tensor), so the
host keeps queueing the next network call while the GPU works: the step's inner products are one batched float64
matrix product, AND's count of singular systems stays a device tensor, and the noise drawn on the CPU reaches
the device through pinned memory without waiting.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

KINDS = ("ve", "flow")
MODES = ("OR", "AND")
DEFAULT_FLOW_SIGMA_MAX = 0.995
_NOISE_SEED_MIX = 0x5D1FF  # the SDE's noise stream differs from the initial noise drawn with the same seed
ODE_REFUSAL = (
    "the Itô density estimator (Thm. 1) holds only for the reverse SDE, whose noise has the forward process's "
    "g; a deterministic (ODE) step would need each network's divergence (Prop. 5)"
)


# -- settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuperDiffSettings:
    """How κ is chosen and guarded.

    - ``mode``: "OR" (mixture, κ = softmax(T·log q + bias)) or "AND" (equal log-density increments).
    - ``temperature``: T of the OR softmax; 1 = the exact mixture, larger = sharper (the paper uses 1 and 100),
      0 = fixed weights softmax(bias) (the "average of scores" baseline). Ignored by AND.
    - ``bias``: one value per component in nats (empty = all 0). OR: added inside the softmax (log ω_i for
      mixture weights ω). AND: the run ends with log q^i − bias_i equal across components (eq. 18 with the
      offset spread evenly over the steps).
    - ``kappa_clamp``: 0 = unbounded κ (the reference behaviour; AND κ can reach ±35). c ≥ 1 shrinks κ toward
      equal weights until every κ_i lies in [1 − c, c] (1 = a convex mixture).
    - ``and_epsilon``: 0 = the exact AND system (reference). ε > 0 adds ε·mean|A_ii| to A's diagonal, which keeps
      κ finite when the components' predictions nearly coincide (it pulls κ toward equal weights).
    - ``flow_sigma_max``: flow models start sampling at the first σ below this (α = 0 at σ = 1).
    """

    mode: str = "OR"
    temperature: float = 1.0
    bias: tuple[float, ...] = ()
    kappa_clamp: float = 0.0
    and_epsilon: float = 0.0
    flow_sigma_max: float = DEFAULT_FLOW_SIGMA_MAX

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SuperDiff mode '{self.mode}' is not one of {', '.join(MODES)}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if any(not math.isfinite(b) for b in self.bias):
            raise ValueError(f"bias values must be finite numbers, got {list(self.bias)}")
        if self.kappa_clamp != 0 and not self.kappa_clamp >= 1:
            raise ValueError(
                f"kappa_clamp {self.kappa_clamp}: use 0 (off) or a value ≥ 1 (κ within [1 − c, c]; 1 = convex mix)"
            )
        if not self.and_epsilon >= 0:
            raise ValueError(f"and_epsilon must be ≥ 0, got {self.and_epsilon}")
        if not 0 < self.flow_sigma_max < 1:
            raise ValueError(f"flow_sigma_max must lie strictly between 0 and 1, got {self.flow_sigma_max}")

    def bias_for(self, count: int) -> tuple[float, ...]:
        """The bias of each of ``count`` components (all 0 when none was given)."""
        if not self.bias:
            return (0.0,) * count
        if len(self.bias) != count:
            raise ValueError(
                f"bias has {len(self.bias)} value(s) but there are {count} components: give one value per "
                "component, in chain order, or leave it empty"
            )
        return self.bias


def parse_bias(text: str) -> tuple[float, ...]:
    """Comma- or space-separated numbers ("0, -1.2") → floats; empty → ()."""
    parts = [part for part in text.replace(",", " ").split() if part]
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError(f"bias '{text}': expected numbers separated by commas, e.g. '0, -1.2'") from None


# -- the SDE ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCoefficients:
    """One reverse step σ → σ_next of the SDE in ``kind``'s parameterisation (Prop. 2 at the step's start)."""

    kind: str
    sigma: float
    sigma_next: float
    delta: float  # σ − σ_next > 0
    log_alpha_rate: float  # a = d log α / dσ
    g2: float  # g² = 2σ²(1/σ − a)

    @property
    def noise_std(self) -> float:
        return math.sqrt(self.g2 * self.delta)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown parameterisation '{kind}'; SuperDiff supports {', '.join(KINDS)}")


def alpha(kind: str, sigma: float) -> float:
    """α(σ) of x = α x₀ + σ ε: 1 for VE (ε/v models), 1 − σ for rectified flow."""
    check_kind(kind)
    return 1.0 if kind == "ve" else 1.0 - sigma


def step_coefficients(kind: str, sigma: float, sigma_next: float, noise: bool = True) -> StepCoefficients:
    """Drift rate and diffusion of the reverse step ``sigma`` → ``sigma_next`` (Prop. 2, left point).

    ``noise=False`` asks for a deterministic (ODE) step, which the Itô estimator cannot follow: refused.
    """
    check_kind(kind)
    if not noise:
        raise ValueError(ODE_REFUSAL)
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not (math.isfinite(sigma) and math.isfinite(sigma_next)) or sigma_next < 0:
        raise ValueError(f"invalid step σ {sigma} → {sigma_next}")
    if not sigma_next < sigma:
        raise ValueError(
            f"SuperDiff runs the reverse SDE, so σ must decrease at every step; got σ {sigma:.6g} → {sigma_next:.6g}"
        )
    if kind == "flow" and sigma >= 1:
        raise ValueError(f"a flow-model step from σ = {sigma:.6g} ≥ 1: α = 0 there, start below 1 (start_schedule)")
    rate = 0.0 if kind == "ve" else -1.0 / (1.0 - sigma)
    g2 = 2.0 * sigma - 2.0 * sigma * sigma * rate
    return StepCoefficients(kind, sigma, sigma_next, sigma - sigma_next, rate, g2)


def score_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
    """∇log q_σ(x) = (α·D(x, σ) − x)/σ² (Tweedie) in float32; ``denoised`` may carry a leading component axis."""
    a = alpha(kind, sigma)
    scaled = denoised.float() if a == 1.0 else a * denoised.float()  # 1·D is D exactly: one launch fewer
    return (scaled - x.float()) / (sigma * sigma)


def denoised_from_score(x: torch.Tensor, score: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
    """The inverse of :func:`score_from_denoised` (for previews of the mixture)."""
    a = alpha(kind, sigma)
    denoised = x.float() + sigma * sigma * score
    return denoised if a == 1.0 else denoised / a


def reverse_sde_step(
    x: torch.Tensor, mixed_score: torch.Tensor, noise: torch.Tensor, coefficients: StepCoefficients
) -> torch.Tensor:
    """Euler–Maruyama step of the reverse SDE (Prop. 1, ξ = g²/2): x + Δ(−a x + g² ŝ_mix) + √(g²Δ) z."""
    c = coefficients
    drift = c.g2 * mixed_score
    if c.log_alpha_rate:  # VE has a = 0: no drift term in x
        drift = -c.log_alpha_rate * x.float() + drift
    moved = torch.add(x.float(), drift, alpha=c.delta)
    return moved.add_(noise.float(), alpha=c.noise_std).to(x.dtype)


# -- per-sample scalars and κ -----------------------------------------------------------------------


def scalar_dtype(device: torch.device | str) -> torch.dtype:
    """float64 for the per-sample scalars where the device has it, else float32 (e.g. Apple MPS)."""
    return torch.float64 if torch.device(device).type in ("cpu", "cuda") else torch.float32


@dataclass(frozen=True)
class DensitySystem:
    """Δlog q^i = Σ_j A_ij κ_j + b_i for every κ with Σκ = 1 (Thm. 1 for this step); A (B, N, N), b (B, N)."""

    matrix: torch.Tensor
    offset: torch.Tensor

    def increments(self, kappa: torch.Tensor) -> torch.Tensor:
        kappa = kappa.to(self.matrix.dtype).unsqueeze(-1)
        return torch.baddbmm(self.offset.unsqueeze(-1), self.matrix, kappa).squeeze(-1)


def density_system(
    scores: torch.Tensor, guided_scores: torch.Tensor, noise: torch.Tensor, coefficients: StepCoefficients
) -> DensitySystem:
    """The affine map κ → Δlog q of one step (module docstring). ``scores``/``guided_scores``: (N, B, …).

    Every inner product the step needs (⟨s_i, ŝ_j⟩, ⟨s_i, z⟩, ⟨s_i, s_i⟩) comes from ONE batched float64 product
    of the unguided scores with [ŝ; z; s]: a handful of kernel launches whatever N is.
    """
    count, batch = scores.shape[:2]
    dtype = scalar_dtype(scores.device)
    z = noise.reshape(1, batch, -1).to(device=scores.device, dtype=scores.dtype)
    stacked = torch.cat([guided_scores.reshape(count, batch, -1), z, scores.reshape(count, batch, -1)])
    stacked = stacked.to(dtype).transpose(0, 1)  # (B, 2N + 1, D)
    products = torch.bmm(stacked[:, count + 1 :], stacked.transpose(1, 2))  # (B, N, 2N + 1): rows s_i
    cross, noise_term = products[:, :, :count], products[:, :, count]
    norms = products[:, :, count + 1 :].diagonal(dim1=1, dim2=2)
    dims = stacked.shape[-1]
    c = coefficients
    matrix = (c.g2 * c.delta) * cross
    offset = torch.add(c.noise_std * noise_term, norms, alpha=-0.5 * c.g2 * c.delta)
    if c.log_alpha_rate:  # VE has a = 0
        offset = offset + c.delta * dims * c.log_alpha_rate
    return DensitySystem(matrix, offset)


def or_kappa(
    log_density: torch.Tensor, temperature: float, bias: Sequence[float] | torch.Tensor | None
) -> torch.Tensor:
    """κ = softmax(T·log q + bias) per sample (Algorithm 1), max-subtracted; ``log_density`` (B, N).

    ``bias``: numbers, or a tensor already on the device (as :func:`bias_tensor` makes once per run).
    """
    logits = log_density if temperature == 1.0 else temperature * log_density
    if isinstance(bias, torch.Tensor) or (bias is not None and any(bias)):
        logits = logits + torch.as_tensor(bias, dtype=log_density.dtype, device=log_density.device)
    return torch.softmax(logits, dim=-1)


def bias_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor | None:
    """``values`` (bias or AND offsets) as a tensor on ``like``'s device and dtype, made once per run instead of
    at every step; None when there are none."""
    if not values or not any(values):
        return None
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


def and_system(
    system: DensitySystem, offsets: Sequence[float] | None = None, epsilon: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """AND's (N+1)×(N+1) system per sample (App. C.1, eq. 18 offsets): [A  −1; 1ᵀ  0]·[κ; dlog] = [o − b; 1].

    Row i says Δlog q^i − o_i = dlog (every component's log-density changes by the same dlog, up to its
    offset o_i); the last row says Σκ = 1. ``epsilon`` > 0 adds ε·mean|A_ii| to A's diagonal (the optional guard:
    with nearly equal predictions it pulls κ toward equal weights). Returns (matrix (B, N+1, N+1), rhs (B, N+1)).
    """
    matrix, offset = _guarded_matrix(system.matrix, epsilon), system.offset
    batch, count = offset.shape
    full = matrix.new_zeros(batch, count + 1, count + 1)
    full[:, :count, :count] = matrix
    full[:, :count, count] = -1.0
    full[:, count, :count] = 1.0
    rhs = offset.new_zeros(batch, count + 1)
    rhs[:, :count] = -offset
    if offsets is not None:
        rhs[:, :count] += torch.as_tensor(offsets, dtype=offset.dtype, device=offset.device)
    rhs[:, count] = 1.0
    return full, rhs


def and_kappa(
    system: DensitySystem, offsets: Sequence[float] | torch.Tensor | None = None, epsilon: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """κ (B, N) solving :func:`and_system`, and how many samples' systems were singular (a 0-d tensor on the
    device: reading it waits for the device, so callers sum it over a run and read it once).

    The border is eliminated exactly (subtract row N from the others, substitute κ_N = 1 − Σ_{j<N} κ_j), which
    leaves an (N−1)×(N−1) system per sample; for N = 2 it is the authors' closed form. Identical components
    make it exactly singular: those samples get equal weights instead of the reference code's NaN.
    """
    a, c = _guarded_matrix(system.matrix, epsilon), system.offset  # Δlog q^i − o_i = Σ_j a_ij κ_j + c_i
    if offsets is not None:
        c = c - torch.as_tensor(offsets, dtype=c.dtype, device=c.device)
    count = c.shape[-1]
    if count == 1:
        return torch.ones_like(c), torch.zeros((), dtype=torch.int64, device=c.device)
    last = count - 1
    rows = a[:, :last] - a[:, last:]  # row i − row N
    reduced = rows[:, :, :last] - rows[:, :, last:]  # then column j − column N
    right = (c[:, last:] - c[:, :last]) - rows[:, :, last]
    if last == 1:  # two components: θ = right / reduced, what LU on a 1×1 system computes, in one launch
        theta = right / reduced[:, 0]
        singular = None
    else:
        theta, info = torch.linalg.solve_ex(reduced, right)  # no device sync without check_errors
        singular = info[:, None] != 0
    total = theta.sum(-1, keepdim=True)
    kappa = torch.cat([theta, 1.0 - total], dim=-1)
    # Σθ − Σθ is 0 exactly when every θ is finite (NaN otherwise): one test for the whole row
    invalid = (total - total).ne(0)
    if singular is not None:
        invalid = invalid.logical_or_(singular)
    kappa = torch.where(invalid, 1.0 / count, kappa)
    return kappa, invalid.sum()


def _guarded_matrix(matrix: torch.Tensor, epsilon: float) -> torch.Tensor:
    """A with ε·mean|A_ii| added to its diagonal (the optional AND guard); A itself when ε = 0."""
    if not epsilon:
        return matrix
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True)
    count = matrix.shape[-1]
    return matrix + epsilon * scale[..., None] * torch.eye(count, dtype=matrix.dtype, device=matrix.device)


def clamp_kappa(kappa: torch.Tensor, limit: float) -> torch.Tensor:
    """Shrink κ toward equal weights until every κ_i lies in [1 − limit, limit]; limit 0 = unchanged.

    κ' = u + t·(κ − u) with u = 1/N and the largest t ≤ 1 that fits, so Σκ' = Σκ = 1 (needs limit ≥ 1).
    """
    if not limit:
        return kappa
    uniform = 1.0 / kappa.shape[-1]
    excess = kappa - uniform
    room = torch.where(excess > 0, limit - uniform, (1.0 - limit) - uniform)
    ratio = torch.where(excess != 0, room / excess.where(excess != 0, torch.ones_like(excess)), torch.ones_like(excess))
    t = ratio.clamp(max=1.0).amin(-1, keepdim=True).clamp(min=0.0)
    return uniform + t * excess


def mix(kappa: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Σ_j κ_j · stacked_j per sample: ``kappa`` (B, N), ``stacked`` (N, B, …) → (B, …) in float32."""
    weights = kappa.t().to(torch.float32).reshape(*kappa.t().shape, *([1] * (stacked.dim() - 2)))
    return (weights.to(stacked.device) * stacked.float()).sum(0)


# -- one step ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    x: torch.Tensor  # the sample at σ_next
    log_density: torch.Tensor  # (B, N) accumulated estimates after the step
    kappa: torch.Tensor  # (B, N) the weights used
    mixed_score: torch.Tensor  # (B, …) Σκ_j ŝ_j (its denoised is the preview)
    invalid: torch.Tensor | None  # AND: 0-d count of samples whose system was singular (given equal weights)


def superdiff_step(
    x: torch.Tensor,
    scores: torch.Tensor,
    guided_scores: torch.Tensor,
    noise: torch.Tensor,
    log_density: torch.Tensor,
    coefficients: StepCoefficients,
    settings: SuperDiffSettings,
    bias: Sequence[float] | torch.Tensor | None,
    and_offsets: Sequence[float] | torch.Tensor | None = None,
) -> StepResult:
    """One SuperDiff step: κ (OR from the log-densities so far; AND from this step's system with ``noise``
    already drawn), the Euler–Maruyama move, and every component's Itô log-density update.

    ``scores``: unguided scores s_i (N, B, …); ``guided_scores``: CFG'd ŝ_i (N, B, …); ``noise``: z ~ N(0, I)
    shaped like x; ``log_density``: (B, N) estimates so far; ``and_offsets``: AND's per-step offsets (eq. 18).
    ``bias`` and ``and_offsets`` may be numbers or tensors on the device (:func:`bias_tensor`, made once per run).
    """
    if noise is None:
        raise ValueError(ODE_REFUSAL)
    system = density_system(scores, guided_scores, noise, coefficients)
    invalid = None
    if settings.mode == "OR":
        kappa = or_kappa(log_density.to(system.offset.dtype), settings.temperature, bias)
    else:
        kappa, invalid = and_kappa(system, and_offsets, settings.and_epsilon)
    kappa = clamp_kappa(kappa, settings.kappa_clamp)
    mixed = mix(kappa, guided_scores)
    x_next = reverse_sde_step(x, mixed, noise, coefficients)
    updated = system.increments(kappa) + log_density.to(system.offset.dtype)
    return StepResult(x_next, updated, kappa, mixed, invalid)


# -- schedules ----------------------------------------------------------------------------------------


def start_schedule(sigmas: torch.Tensor, kind: str, flow_sigma_max: float = DEFAULT_FLOW_SIGMA_MAX) -> int:
    """How many leading σ to skip: flow schedules start at their first σ below ``flow_sigma_max``.

    At σ = 1 a flow model's α is 0 and g² infinite (the NaN reported when porting SuperDiff to flow schedulers),
    and steps from just below 1 are far too coarse for Euler–Maruyama, so the run starts at the first σ below
    the cap instead (see :func:`restart_flow`). VE schedules start where they are.
    """
    check_kind(kind)
    values = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]  # one read-back
    if len(values) < 2:
        raise ValueError("SuperDiff needs a schedule of at least two σ (one step)")
    if kind == "ve":
        return 0
    skip = next((i for i, s in enumerate(values) if s < flow_sigma_max), len(values))
    if skip >= len(values) - 1:
        raise ValueError(
            f"this flow schedule has no step below σ {flow_sigma_max} (σ: {values[:4]}…): use more steps or "
            "a lower flow_sigma_max"
        )
    return skip


def restart_flow(x: torch.Tensor, latent: torch.Tensor | None, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """Move a flow sample x = (1 − σ) L + σ n from ``sigma_from`` to ``sigma_to`` with the same noise n.

    ``latent`` is the clean latent L that noise was added to (None or zeros for text-to-image): the result is
    what ComfyUI's noise scaling would have produced for a schedule starting at ``sigma_to``.
    """
    base = torch.zeros_like(x) if latent is None else latent.to(x)
    unit_noise = (x - (1.0 - sigma_from) * base) / sigma_from
    return sigma_to * unit_noise + (1.0 - sigma_to) * base


def and_step_offsets(bias: Sequence[float], steps: int) -> tuple[float, ...] | None:
    """AND's per-step offsets (eq. 18): bias_i spread evenly over ``steps``; None when all zero."""
    if not any(bias):
        return None
    return tuple(b / steps for b in bias)


def noise_generator(seed: int | None) -> torch.Generator:
    """The CPU generator of the SDE's noise (device-independent; a different stream from the initial noise)."""
    return torch.Generator(device="cpu").manual_seed((int(seed or 0) + _NOISE_SEED_MIX) % 2**63)


def draw_noise(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """z ~ N(0, I) shaped like ``like``, from ``generator`` on the CPU, moved to ``like``'s device.

    On CUDA the draw goes through pinned memory and is copied without waiting: a plain copy from pageable memory
    would block the host until the device had finished everything queued (the step's network call).
    """
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32)
    if like.device.type != "cuda":
        return noise.to(like.device)
    return noise.pin_memory().to(like.device, non_blocking=True)


# -- traces -------------------------------------------------------------------------------------------


@dataclass
class SuperDiffTrace:
    """What one SuperDiff run did, per sample: κ at every step and the log-density estimates at every σ.

    ``kappa``: (steps, B, N); ``log_density``: (steps + 1, B, N), starting at 0 (estimates are relative to the
    starting point: the accumulators start equal, ``docs/methods.md`` SuperDiff note 8); ``sigmas``: (steps + 1,)
    the σ actually used.
    """

    mode: str
    kind: str
    temperature: float
    bias: tuple[float, ...]
    sigmas: torch.Tensor
    kappa: torch.Tensor
    log_density: torch.Tensor
    invalid_kappa: int = 0
    labels: tuple[str, ...] = field(default_factory=tuple)

    @property
    def steps(self) -> int:
        return int(self.kappa.shape[0])

    @property
    def batch(self) -> int:
        return int(self.kappa.shape[1])

    @property
    def components(self) -> int:
        return int(self.kappa.shape[2])

    def __str__(self) -> str:
        final = self.log_density[-1]
        return (
            f"SuperDiff {self.mode} trace: {self.components} components, {self.batch} sample(s), {self.steps} steps "
            f"(σ {float(self.sigmas[0]):.4g} → {float(self.sigmas[-1]):.4g}); final κ (sample 1): "
            f"{[round(float(k), 4) for k in self.kappa[-1, 0]]}; final log-density change (sample 1): "
            f"{[round(float(v), 2) for v in final[0]]}"
        )

    def plot_data(self, max_points: int = 128, max_samples: int = 4) -> dict:
        """A small JSON-able summary for the editor's plot: κ and relative log-densities per sample."""
        step_index = _downsample(self.steps, max_points)
        point_index = _downsample(self.steps + 1, max_points)
        relative = self.log_density - self.log_density.mean(-1, keepdim=True)
        samples = range(min(self.batch, max_samples))
        return {
            "mode": self.mode,
            "kind": self.kind,
            "components": self.components,
            "labels": list(self.labels) or [f"component {i + 1}" for i in range(self.components)],
            "steps": self.steps,
            "batch": self.batch,
            "kappa_steps": step_index,
            "density_steps": point_index,
            "sigmas": [float(self.sigmas[i]) for i in point_index],
            "kappa": [[[_finite(v) for v in self.kappa[i, b]] for i in step_index] for b in samples],
            "log_density": [[[_finite(v) for v in relative[i, b]] for i in point_index] for b in samples],
            "final_log_density": [[_finite(v) for v in self.log_density[-1, b]] for b in samples],
        }


def _downsample(length: int, max_points: int) -> list[int]:
    if length <= max_points:
        return list(range(length))
    return sorted({round(i * (length - 1) / (max_points - 1)) for i in range(max_points)})


def _finite(value) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def latent_fingerprint(tensor: torch.Tensor) -> str:
    """A content hash of a latent (to find the trace of the run that produced it)."""
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()
