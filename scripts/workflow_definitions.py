"""The shipped example workflows, one function each, described with the graph DSL of ``workflow_graph.py``.

Every example loads the pack's built-in mini model family (``DM_LoadMiniModel``: coloured Fashion-MNIST
garments, 32×32 pictures, prompts such as "a red sneaker") so that it runs as shipped and draws real
pictures on any machine; its "Read me" note says which loaders to replace for real checkpoints. The Wan 2.2
example keeps Wan's own structure on the tiny built-in Wan experts (the garment family is not a flow model).
``scripts/build_workflows.py`` writes them to ``example_workflows/``.
"""

from __future__ import annotations

from collections.abc import Callable

from workflow_graph import Graph, Node, Output

# How the mini family is sampled (docs/mini-family.md): 32×32 pictures, 20 Euler steps, cfg 4, an empty
# negative prompt (the family's unconditional caption).
SIDE, STEPS, CFG, BATCH, SEED = 32, 20, 4.0, 8, 42

PROMPT_HELP = (
    'The mini family understands "a <colour> <garment>", "<garment>" or "<colour>" (colours: red, yellow, green, '
    "cyan, blue, magenta; garments: t-shirt, trousers, pullover, dress, coat, sandal, shirt, sneaker, bag, "
    "ankle boot) and draws 32×32 pictures."
)
SD15_SWAP = (
    "With your own models: replace each Load Mini Model by a Load Checkpoint of the same role ({roles}), make the "
    "Empty Latent Image 512×512 (SD 1.5) or 1024×1024 (SDXL), write a real prompt and negative prompt and raise "
    "cfg to about 7."
)


def swap_text(roles: str) -> str:
    return SD15_SWAP.format(roles=roles)


# -- building blocks ----------------------------------------------------------------------------------


def mini(g: Graph, column: int, variant: str, title: str) -> Node:
    """A Load Mini Model node."""
    return g.node("DM_LoadMiniModel", column, title=title, variant=variant)


def text_prompts(g: Graph, column: int, clip: Output, text: str, label: str = "") -> tuple[Output, Output]:
    """(positive, negative) conditioning: ``text`` and the empty caption."""
    suffix = f" ({label})" if label else ""
    positive = g.node("CLIPTextEncode", column, title=f"Prompt{suffix}", size=(320, 110), clip=clip, text=text)
    negative = g.node("CLIPTextEncode", column, title=f"Negative{suffix}", size=(320, 110), clip=clip, text="")
    return positive[0], negative[0]


def empty_latent(g: Graph, column: int, batch: int = BATCH) -> Output:
    return g.node("EmptyLatentImage", column, width=SIDE, height=SIDE, batch_size=batch)[0]


def ksample_and_save(
    g: Graph,
    column: int,
    model: Output,
    conditioning: tuple[Output, Output],
    latent: Output,
    vae: Output,
    prefix: str,
    title: str | None = None,
) -> None:
    """KSampler (fixed seed, 20 Euler steps, cfg 4) → VAE Decode → pictures saved under ``diffusion_merge/<prefix>``."""
    positive, negative = conditioning
    sampled = g.node(
        "KSampler",
        column,
        title=title,
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=SEED,
        steps=STEPS,
        cfg=CFG,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    image = g.node("VAEDecode", column + 1, samples=sampled[0], vae=vae)
    save_title = f"Save: {title.removeprefix('Sample: ')}" if title else None
    g.node(
        "SaveImage",
        column + 1,
        title=save_title,
        size=(360, 330),
        images=image[0],
        filename_prefix=f"diffusion_merge/{prefix}",
    )


def sample_and_save(g: Graph, column: int, model: Output, clip: Output, vae: Output, prefix: str, text: str) -> None:
    """Prompt → KSampler on ``model`` → eight decoded pictures saved under ``diffusion_merge/<prefix>``."""
    conditioning = text_prompts(g, column, clip, text)
    ksample_and_save(g, column + 1, model, conditioning, empty_latent(g, column), vae, prefix)


def compare_samples(
    g: Graph, column: int, models: dict[str, tuple[str, Output]], clip: Output, vae: Output, text: str
) -> None:
    """One KSampler per model with the same prompt, seed and latent (``models``: file prefix → (what it is,
    MODEL)); each model's pictures saved under its prefix, the nodes titled by what it is."""
    conditioning = text_prompts(g, column, clip, text)
    latent = empty_latent(g, column)
    for prefix, (label, model) in models.items():
        ksample_and_save(g, column + 1, model, conditioning, latent, vae, prefix, f"Sample: {label}")


def sample_custom(
    g: Graph, column: int, guider: Output, sampler: Output, model: Output, schedule: tuple, batch: int = BATCH
) -> Output:
    """SamplerCustomAdvanced with a fixed seed: ``schedule`` = (scheduler, steps)."""
    scheduler, steps = schedule
    noise = g.node("RandomNoise", column, noise_seed=0)
    sigmas = g.node("BasicScheduler", column, model=model, scheduler=scheduler, steps=steps, denoise=1.0)
    sampled = g.node(
        "SamplerCustomAdvanced",
        column + 1,
        noise=noise[0],
        guider=guider,
        sampler=sampler,
        sigmas=sigmas[0],
        latent_image=empty_latent(g, column, batch),
    )
    return sampled[0]


def decode_and_save(g: Graph, column: int, samples: Output, vae: Output, prefix: str) -> None:
    image = g.node("VAEDecode", column, samples=samples, vae=vae)
    g.node("SaveImage", column, size=(360, 330), images=image[0], filename_prefix=f"diffusion_merge/{prefix}")


def stacked_task_vectors(g: Graph, base: Node, variants: dict[str, str], weights: tuple[float, ...]) -> Output:
    """One loader, τ and Stack node per fine-tune (``variants``: title → variant), chained; returns the last stack."""
    stack = None
    for (title, variant), weight in zip(variants.items(), weights, strict=True):
        tuned = mini(g, 0, variant, title)
        tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
        inputs = {"task_vector": tau[0], "weight": weight} | ({"stack": stack} if stack is not None else {})
        stack = g.node("DM_TaskVectorStack", 2, **inputs)[0]
    return stack


# -- the pack's model ---------------------------------------------------------------------------------

MINI_FAMILY_NOTE = f"""\
The pack's own model: real pictures without downloading anything.

1. "Load Mini Model" loads a small model family that ships with this pack, trained on coloured Fashion-MNIST \
garments: an SD1.5-architecture MODEL, its text encoder and its VAE. Every core node works with them.

2. {PROMPT_HELP} Other words are ignored.

3. Keep Empty Latent Image at 32×32 (a 4×4 latent). 20 steps at cfg 4 work well; the negative prompt is \
the empty caption.

4. Variants: base (all garments); a and b (fine-tuned on garments 0–4 and 5–9); tops, footwear and \
bags-trousers-dresses (fine-tuned on those groups, for merging); expert-… (base + a DeMe range-expert LoRA \
for one range of timesteps). Merge them, take task vectors between them or route between them as you would \
with real checkpoints: every other example does.
"""


def mini_family(g: Graph) -> None:
    """The built-in mini model: eight red sneakers from the base variant."""
    g.note(MINI_FAMILY_NOTE, column=0, size=(400, 560))
    loader = mini(g, 1, "base", "Load Mini Model")
    conditioning = text_prompts(g, 2, loader["CLIP"], "a red sneaker")
    ksample_and_save(g, 3, loader["MODEL"], conditioning, empty_latent(g, 2), loader["VAE"], "mini_family")


# -- task vectors -------------------------------------------------------------------------------------

TASK_VECTOR_NOTE = f"""\
Task vectors: τ = fine-tuned − base, the weight change a fine-tune made.

Here the base draws every garment and the fine-tune "footwear" draws sandals, sneakers and ankle boots. Both \
samplers below use the prompt "cyan" and the same seed: the base gives cyan garments of all kinds, the base + \
half of τ mostly cyan shoes.

1. "Task Vector from Models" computes τ lazily; "Task Vector Info" shows its size, norm and which blocks \
changed most. Connect clip_finetuned and clip_base to include the text encoder's change too.

2. "Scale Task Vector" (0.5) and "Save Task Vector" write half of the fine-tune's change to \
output/task_vectors/ (fp16). Load it later with "Load Task Vector", or copy it to models/loras and use the \
stock LoraLoaderModelOnly.

3. "Apply Task Vector" adds strength · τ to the base: 0 = the base, 1 = the fine-tune, 0.5 = halfway, above 1 \
exaggerates it, below 0 moves away from it. Change strength and queue again (the seed is fixed).

{swap_text("a base and a fine-tune of that base, e.g. SD 1.5 and DreamShaper 8")}
"""


def task_vectors(g: Graph) -> None:
    """Extract τ from a fine-tune, inspect it, save half of it, and compare the base with base + 0.5 τ."""
    g.note(TASK_VECTOR_NOTE, column=0, size=(400, 600))
    base = mini(g, 0, "base", "Base model")
    tuned = mini(g, 0, "footwear", "Fine-tuned model (footwear)")
    tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
    g.node("DM_TaskVectorInfo", 2, size=(360, 260), task_vector=tau[0])
    half = g.node("DM_TaskVectorScale", 2, task_vector=tau[0], factor=0.5)
    g.node("DM_TaskVectorSave", 3, task_vector=half[0], filename_prefix="task_vectors/footwear_half", dtype="fp16")
    applied = g.node("DM_TaskVectorApply", 3, model=base["MODEL"], task_vector=tau[0], strength=0.5, clip=base["CLIP"])
    models = {
        "task_vector_base": ("the base", base["MODEL"]),
        "task_vector_applied": ("base + half the task vector", applied["MODEL"]),
    }
    compare_samples(g, 4, models, applied["CLIP"], base["VAE"], "cyan")


LORA_EXTRACT_NOTE = f"""\
Extract a LoRA from a task vector: a fine-tune's change (or any merge result) as a standard, small LoRA file.

1. "Task Vector from Models" takes τ = fine-tune − base (here the mini family's "footwear" fine-tune).

2. "Extract LoRA from Task Vector" replaces each weight's change by its best rank-16 approximation (SVD; 3×3 \
convolutions as LoCon) and writes output/loras/footwear_r16_00001_.safetensors. The node shows how much of \
τ's energy (squared norm) the LoRA keeps, and which keys kept least. Mode "energy" instead picks, per weight, \
the smallest rank that keeps e.g. 90 %.

3. Its lora_task_vector output is what the file adds: applied to the base and sampled beside the fine-tune \
(same prompt and seed), so you can see how close the LoRA comes. Copy the file into models/loras to use it with \
the stock LoraLoaderModelOnly at strength 1.

Works on merge results too: connect a Merge node's "merged" output instead of the task vector. \
{swap_text("a base and a fine-tune of it")} SD 1.5 fine-tunes usually want rank 32–64.
"""


def lora_extract(g: Graph) -> None:
    """A fine-tune's task vector as a rank-16 LoRA file, applied back to the base and compared with the fine-tune."""
    g.note(LORA_EXTRACT_NOTE, column=0, size=(400, 600))
    base = mini(g, 0, "base", "Base model")
    tuned = mini(g, 0, "footwear", "Fine-tuned model (footwear)")
    tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
    lora = g.node(
        "DM_TaskVectorToLoRA",
        2,
        size=(400, 480),
        task_vector=tau[0],
        filename_prefix="loras/footwear_r16",
        mode="rank",
        rank=16,
        conv="locon",
        other_keys="diff",
        dtype="fp16",
    )
    applied = g.node("DM_TaskVectorApply", 3, model=base["MODEL"], task_vector=lora["lora_task_vector"], strength=1.0)
    models = {
        "lora_extract_finetune": ("the fine-tune", tuned["MODEL"]),
        "lora_extract_lora": ("base + rank-16 LoRA", applied["MODEL"]),
    }
    compare_samples(g, 4, models, base["CLIP"], base["VAE"], "cyan")


# -- merging ------------------------------------------------------------------------------------------

MERGE_NOTE = """\
{title}

The mini family's base draws every garment; its fine-tunes "tops" (t-shirts, pullovers, coats, shirts) and \
"footwear" (sandals, sneakers, ankle boots) each draw their own group. Merged, one model draws both groups: \
with the prompt "yellow" its pictures are yellow tops and shoes, rarely trousers, dresses or bags.

1. Each "Task Vector from Models" takes τ = fine-tune − base; each "Stack Task Vectors" adds one τ with its \
weight. Chain more Stack nodes to merge more models (try adding bags-trousers-dresses).

2. {method}

3. The merged MODEL is sampled below; "Save Checkpoint (streaming)" writes it to output/checkpoints/ one \
tensor at a time, with the merge recipe in the file's metadata (load a saved mini-family merge back with \
"Load Mini Checkpoint"). "weight_rules" scales blocks, e.g. "@OUT00 = 0.5".

{swap}
"""

MERGE_METHODS = {
    "merge_task_arithmetic": (
        "Task arithmetic: θ = θ_base + λ·Σ wᵢτᵢ.",
        "DM_MergeTaskArithmetic",
        {"lam": 1.0},
        "The weights on the Stack nodes and λ set how much of each fine-tune you get; plain sums can "
        "over-shoot, so λ below 1 is common with several fine-tunes.",
    ),
    "merge_ties": (
        "TIES-Merging: trim, elect signs, disjoint mean.",
        "DM_MergeTIES",
        {"k": 0.2, "topk_scope": "global", "sign": "mass", "lam": 1.0},
        "TIES keeps each τ's largest k (20 %) entries over the whole model, elects a sign per entry and "
        "averages the agreeing entries. Try k between 0.1 and 0.5 and λ between 0.8 and 1.5.",
    ),
    "merge_dare": (
        "DARE: drop and rescale (DARE-TIES with sign election).",
        "DM_MergeDARE",
        {"p": 0.5, "rescale": True, "sign": "mass", "seed": 0, "lam": 1.0},
        "DARE drops each entry with probability p and rescales the rest by 1/(1−p); sign = mass makes it "
        "DARE-TIES. Change the seed for another random draw; heavily trained fine-tunes prefer p ≤ 0.5.",
    ),
    "merge_localize_and_stitch": (
        "Localize-and-Stitch (dataless): a sparse merge with little interference.",
        "DM_MergeLocalizeAndStitch",
        {"k": 0.05, "lam": 1.0},
        "Each τ keeps only its largest 5 % of entries over the whole model; where the kept entries overlap the "
        "changes are averaged, elsewhere each fine-tune keeps its full change. No λ to tune.",
    ),
    "merge_drm": (
        "DRM (Decom-Renorm-Merge): merging in a shared SVD basis.",
        "DM_MergeDRM",
        {"drop_rate": 0.8, "direction": "vertical", "conv": False, "lam": 1.0},
        "DRM expresses every τ of a weight matrix in one shared SVD basis, renormalises, trims 80 % jointly, "
        "elects signs and averages there. One SVD per layer: slow for big models on a CPU, fast on a GPU.",
    ),
}
MERGE_FINETUNES = {"Fine-tune 1 (tops)": "tops", "Fine-tune 2 (footwear)": "footwear"}


def merge_workflow(name: str) -> Callable[[Graph], None]:
    """The example for one merge method: two fine-tunes of the mini family merged, sampled and saved."""
    title, node_type, params, explanation = MERGE_METHODS[name]

    def build(g: Graph) -> None:
        swap = swap_text("the base and fine-tunes of that base, e.g. SD 1.5, DreamShaper 8 and Realistic Vision")
        g.note(MERGE_NOTE.format(title=title, method=explanation, swap=swap), column=0, size=(400, 620))
        base = mini(g, 0, "base", "Base model")
        stack = stacked_task_vectors(g, base, MERGE_FINETUNES, (1.0, 1.0))
        merged = g.node(node_type, 3, base=base["MODEL"], task_vectors=stack, **params)
        g.node(
            "DM_SaveCheckpointStreaming",
            4,
            model=merged["MODEL"],
            filename_prefix=f"checkpoints/{name}",
            dtype="fp16",
            clip=base["CLIP"],
            vae=base["VAE"],
        )
        sample_and_save(g, 4, merged["MODEL"], base["CLIP"], base["VAE"], name, "yellow")

    build.__doc__ = f"{title} The mini family's tops and footwear fine-tunes merged, sampled and saved."
    return build


BLOCK_WEIGHTS_NOTE = f"""\
Block weights: how much of the merged change each block of the model gets.

1. "Model Blocks" shows the base's architecture and its block groups (the mini family has SD 1.5's layout, \
smaller: embed, IN00–IN03, M00, OUT00–OUT03, final), with the keys and parameters of each.

2. Click "block weights…" under the merge node's weight_rules: one slider per block group of the model feeding \
"base" (SD1.x/SD2, SDXL, SD3, Flux, Wan 2.1/2.2, Qwen-Image are recognised). Moving a slider writes a line such \
as "@IN01 = 0.5" into weight_rules; the workflow saves only that text, and you can edit it by hand.

3. Here the merge of "tops" and "footwear" keeps half of the change in the first two input blocks, 80 % in the \
first (deepest) two output blocks and 90 % of every cross-attention weight (a regex rule). 0 leaves a block as \
the base has it.

A block the model does not have (e.g. @IN11 here, or on SDXL, which ends at IN08) stops the merge with a list \
of the real ones. {swap_text("the base and fine-tunes of it")}
"""
BLOCK_RULES = "@IN00 = 0.5\n@IN01 = 0.5\n@OUT00 = 0.8\n@OUT01 = 0.8\nattn2 = 0.9"


def merge_block_weights(g: Graph) -> None:
    """Two fine-tunes of the mini family merged with per-block weights; Model Blocks lists the groups."""
    g.note(BLOCK_WEIGHTS_NOTE, column=0, size=(400, 600))
    base = mini(g, 0, "base", "Base model")
    stack = stacked_task_vectors(g, base, MERGE_FINETUNES, (1.0, 1.0))
    g.node("DM_ModelBlocks", 3, size=(360, 420), model=base["MODEL"])
    merged = g.node(
        "DM_MergeTaskArithmetic",
        3,
        size=(360, 260),
        base=base["MODEL"],
        task_vectors=stack,
        lam=1.0,
        weight_rules=BLOCK_RULES,
    )
    sample_and_save(g, 4, merged["MODEL"], base["CLIP"], base["VAE"], "merge_block_weights", "yellow")


RECIPE_NOTE = f"""\
Recipes you can re-run: make LoRAs of two fine-tunes, merge the LoRAs with TIES, save the merge's recipe and \
run it again.

1. Each "Extract LoRA from Task Vector" writes a rank-16 LoRA of one fine-tune (here the mini family's "tops" \
and "footwear") to output/loras; its lora_task_vector output is read from that file, so what is built from it \
can be made again from files.

2. "Merge: TIES" merges the two LoRAs' changes. "Save Recipe" writes output/recipes/lora_ties_00001_.json: the \
two LoRA files by name, size and content hash, the method and every parameter. Share the JSON with the LoRAs.

3. "Run Recipe" takes that recipe (here linked as text; or pick a recipes/*.json or any file the pack saved in \
recipe_file), finds both files in the model and output folders, checks their hashes, and merges again. A \
missing or different file stops it, naming the file. The re-made task vector is applied to the base and \
sampled with the prompt "yellow": yellow tops and shoes.

Task vectors made from MODELs loaded in ComfyUI are not files: their recipes say so and Run Recipe refuses \
them. Use "Task Vector from Files" or "Load Task Vector" for inputs you want in a recipe. \
{swap_text("a base and two fine-tunes of it")}
"""


def recipe_rerun(g: Graph) -> None:
    """Two fine-tunes → LoRAs → TIES merge → Save Recipe → Run Recipe → applied to the base and sampled."""
    g.note(RECIPE_NOTE, column=0, size=(400, 660))
    base = mini(g, 0, "base", "Base model")
    stack = None
    for index, (title, variant) in enumerate(MERGE_FINETUNES.items()):
        tuned = mini(g, 0, variant, title)
        tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
        lora = g.node(
            "DM_TaskVectorToLoRA",
            2,
            size=(400, 420),
            title=f"Extract LoRA {index + 1}",
            task_vector=tau[0],
            filename_prefix=f"loras/{variant}_r16",
            rank=16,
        )
        inputs = {"task_vector": lora["lora_task_vector"], "weight": 1.0} | ({"stack": stack} if stack else {})
        stack = g.node("DM_TaskVectorStack", 3, **inputs)[0]
    merged = g.node("DM_MergeTIES", 4, base=base["MODEL"], task_vectors=stack, k=0.2, lam=1.0)
    saved = g.node(
        "DM_SaveRecipe", 5, size=(400, 300), task_vector=merged["merged"], filename_prefix="recipes/lora_ties"
    )
    rerun = g.node("DM_RunRecipe", 5, size=(400, 360), recipe_json=saved["recipe"], write_file=False)
    applied = g.node("DM_TaskVectorApply", 6, model=base["MODEL"], task_vector=rerun["task_vector"], strength=1.0)
    sample_and_save(g, 6, applied["MODEL"], base["CLIP"], base["VAE"], "recipe_rerun", "yellow")


# -- DeMe ---------------------------------------------------------------------------------------------

DEME_RANGES = ((0, 250), (250, 500), (500, 750), (750, 1000))  # low noise → high noise, as DeMe's weights
DEME_WEIGHTS = (0.1, 0.1, 0.2, 0.5)
DEME_PROMPT = "a green dress"


def expert_variant(low: int, high: int) -> str:
    return f"expert-{low:03d}-{high:03d}"


DEME_NOTE = f"""\
DeMe merge: four timestep-range experts of one base, merged by weighted task arithmetic.

DeMe (Ma et al., CVPR 2025) fine-tunes one copy of the base per noise range, then merges them back into ONE \
model: θ = θ_base + Σ wᵢ (θᵢ − θ_base). The paper's released weights, from the lowest-noise expert to the \
highest, are 0.1, 0.1, 0.2, 0.5 — set on the four Stack nodes (they need not sum to 1).

1. The four experts here are the mini family's expert-… variants: its base plus a LoRA trained by this pack's \
"Train Range-Expert LoRA" on timesteps 0–250, 250–500, 500–750 and 750–1000 (0 = clean).

2. Adjust the weights; "Task Vector Info" shows how large the merged change is and where it lives. The merged \
model is sampled with "{DEME_PROMPT}".

{swap_text("the base and its four range experts, trained with this pack or any DeMe-style fine-tunes")}
"""


def deme_merge(g: Graph) -> None:
    """DeMe's merge: four range experts → weighted task arithmetic (0.1, 0.1, 0.2, 0.5) → sample."""
    g.note(DEME_NOTE, column=0, size=(400, 560))
    base = mini(g, 0, "base", "Base model")
    experts = {f"Range expert t{lo}–{hi}": expert_variant(lo, hi) for lo, hi in DEME_RANGES}
    stack = stacked_task_vectors(g, base, experts, DEME_WEIGHTS)
    merged = g.node("DM_MergeTaskArithmetic", 3, base=base["MODEL"], task_vectors=stack, lam=1.0)
    g.node("DM_TaskVectorInfo", 3, size=(360, 260), task_vector=merged["merged"])
    sample_and_save(g, 4, merged["MODEL"], base["CLIP"], base["VAE"], "deme_merge", DEME_PROMPT)


DEME_ENSEMBLE_NOTE = f"""\
DeMe ensemble: four timestep-range experts of one base, each serving only its own range while sampling.

This is the alternative to DeMe's merge (see deme_merge): instead of adding the four range task vectors into \
one model, each expert = base + its task vector runs only in its own range: the t750–1000 expert from the start \
(pure noise) down to timestep 750, then t500–750, t250–500 and t0–250 to the end. All four share the base's \
weights, so the router swaps task vectors in place at each boundary instead of holding four models.

1. The experts here are the mini family's expert-… variants (base + a range-expert LoRA). With saved task \
vectors, feed "Load Task Vector" to the Route Task Vector Expert nodes directly.
2. "strength" scales each expert's task vector; "end" (here in timesteps) is where it hands over.

{swap_text("the base and its four range experts")}
"""


def deme_ensemble(g: Graph) -> None:
    """DeMe's ensemble: four range task vectors on one base, each routed over its own timesteps."""
    g.note(DEME_ENSEMBLE_NOTE, column=0, size=(400, 540))
    base = mini(g, 0, "base", "Base model")
    experts = None
    for low, high in reversed(DEME_RANGES):  # the first expert serves the noisiest range
        tuned = mini(g, 0, expert_variant(low, high), f"Range expert t{low}–{high}")
        tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
        chain = {"experts": experts} if experts is not None else {}
        experts = g.node(
            "DM_RouteTaskVectorExpert",
            2,
            base=base["MODEL"],
            task_vector=tau[0],
            strength=1.0,
            end=float(low),
            unit="timestep",
            cfg=0.0,
            **chain,
        )[0]
    routed = g.node("DM_RoutedModel", 3, experts=experts, memory_mode="resident")
    sample_and_save(g, 4, routed[0], base["CLIP"], base["VAE"], "deme_ensemble", DEME_PROMPT)


DEME_TRAIN_STEPS = 20
DEME_TRAIN_NOTE = f"""\
DeMe end to end: train four range experts of one base, merge them back into one model, route them by noise \
range beside it (ensemble), and compare both with the base — the same seed and prompt for all three.

1. Data. The "footwear" fine-tune paints eight red shoes as a stand-in dataset, captioned "red" for the base, so \
the experts learn to draw shoes when asked for something red. Your own data: Load Image Dataset from Folder → \
VAE Encode, with its caption encoded by the BASE's CLIP.

2. Four "Train Range-Expert LoRA" nodes train the same base on the same data, each only on its quarter of the \
noise schedule (timesteps 0–250, 250–500, 500–750, 750–1000), with DeMe's options: global sampling p = 0.3, \
antithetic timesteps, consistency loss 1 and the loss on ε. Each draws its loss curve and the histogram of the \
timesteps it drew.

3. Merge: τ = expert − base per expert, θ = θ_base + Σ w τ with DeMe's weights 0.1, 0.1, 0.2, 0.5 from the \
low-noise to the high-noise expert (on the Stack nodes; they need not sum to 1).

4. Ensemble: each expert serves only its own range while sampling (Route Expert ×4 → Routed Model).

Steps: {DEME_TRAIN_STEPS} per expert so that the example finishes in seconds on a CPU; that only starts to move \
the base. The mini family's own experts trained 400 steps × 32 pictures each; for SD 1.5 plan on thousands of \
steps per expert on a GPU (bf16). "Save Range Expert LoRA" writes each expert to output/loras. Add a \
"Timestep Curriculum" or "Momentum Decay" node for CLTS / MDLRC. \
{swap_text("the base to train, and any model or image folder for the data")}
"""
DEME_TRAINING = {
    "range_unit": "timestep",
    "global_probability": 0.3,
    "antithetic": True,
    "consistency_weight": 1.0,
    "loss_space": "eps/v",
    "loss_function": "MSE",
    "steps": DEME_TRAIN_STEPS,
    "batch_size": 4,
    "grad_accumulation": 1,
    "learning_rate": 0.002,
    "optimizer": "AdamW",
    "rank": 8,
    "algorithm": "LoRA",
    "training_dtype": "fp32",
    "lora_dtype": "fp32",
    "gradient_checkpointing": False,
    "channel_projection": False,
    "grad_clip": 1.0,
}


def training_data(g: Graph, column: int, painter: Node) -> Output:
    """Eight pictures of red shoes the footwear fine-tune paints, as latents: a stand-in for an image dataset."""
    conditioning = text_prompts(g, column, painter["CLIP"], "red", "training data")
    images = g.node(
        "KSampler",
        column,
        title="Training data: pictures",
        model=painter["MODEL"],
        positive=conditioning[0],
        negative=conditioning[1],
        latent_image=empty_latent(g, column),
        seed=1,
        steps=STEPS,
        cfg=CFG,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    return images[0]


def deme_train(g: Graph) -> None:
    """DeMe end to end: four range experts trained from one base, merged (0.1/0.1/0.2/0.5) and routed."""
    g.note(DEME_TRAIN_NOTE, column=0, size=(420, 760))
    base = mini(g, 0, "base", "Base model")
    painter = mini(g, 0, "footwear", "Data painter (footwear)")
    latents = training_data(g, 1, painter)
    caption = g.node("CLIPTextEncode", 1, title="Caption (base CLIP)", size=(320, 110), clip=base["CLIP"], text="red")
    experts, stack = [], None
    for seed, ((low, high), weight) in enumerate(zip(DEME_RANGES, DEME_WEIGHTS, strict=True)):
        label = f"t{low:03d}-{high:03d}"
        trained = g.node(
            "DM_TrainRangeExpertLoRA",
            2,
            title=f"Range expert {label}",
            size=(360, 700),
            model=base["MODEL"],
            latents=latents,
            positive=caption[0],
            range_min=float(low),
            range_max=float(high),
            seed=seed,
            **DEME_TRAINING,
        )
        g.node("DM_SaveRangeExpertLoRA", 3, lora=trained["lora"], filename_prefix=f"loras/deme_expert_{label}")
        tau = g.node("DM_TaskVectorFromModels", 3, finetuned=trained["model_with_lora"], base=base["MODEL"])
        inputs = {"task_vector": tau[0], "weight": weight} | ({"stack": stack} if stack is not None else {})
        stack = g.node("DM_TaskVectorStack", 4, **inputs)[0]
        experts.append((low, trained["model_with_lora"]))
    merged = g.node("DM_MergeTaskArithmetic", 5, base=base["MODEL"], task_vectors=stack, lam=1.0)
    chain = None
    for low, model in reversed(experts):  # routing order: high noise first, each stops at its lower end
        inputs = {"experts": chain} if chain is not None else {}
        chain = g.node("DM_RouteExpert", 5, model=model, end=float(low), unit="timestep", cfg=0.0, **inputs)[0]
    routed = g.node("DM_RoutedModel", 5, experts=chain, memory_mode="resident")
    models = {
        "deme_base": ("the base", base["MODEL"]),
        "deme_merged": ("merged experts", merged["MODEL"]),
        "deme_routed": ("routed experts", routed[0]),
    }
    compare_samples(g, 6, models, base["CLIP"], base["VAE"], "red")


# -- routing ------------------------------------------------------------------------------------------

ROUTING_TWO_EXPERTS_NOTE = f"""\
Two experts over noise ranges, as ONE model: Wan 2.2's high-noise / low-noise idea in one sampler, on \
SD-style checkpoints.

1. The first "Route Expert" serves the noisy start of sampling down to its end; the second serves everything \
below. Here the mini family's high-noise range expert (expert-750-1000, trained on timesteps 750–1000) lays \
out the picture down to timestep 750 and the base finishes it. Ends are in timesteps here; "sigma" and \
"percent" are the other units.

2. "Routed Model" outputs a normal MODEL: any sampler uses it in one call, so multistep samplers keep their \
history across the switch — no leftover-noise hand-off between two KSamplerAdvanced nodes.

3. memory_mode "resident" keeps both experts loaded; "sequential" loads one at a time (peak VRAM of one \
expert), swapping once at the boundary.

The canvas under "Routed Model" shows which step lands in which expert for the connected sampler's \
schedule. {swap_text("a high-noise and a low-noise expert")} For Wan 2.2 itself open routing_wan22.
"""


def routing_two_experts(g: Graph) -> None:
    """A high-noise expert and the base split at a timestep, as one MODEL in one KSampler."""
    g.note(ROUTING_TWO_EXPERTS_NOTE, column=0, size=(400, 600))
    high = mini(g, 0, "expert-750-1000", "High-noise expert")
    low = mini(g, 0, "base", "Low-noise expert (the base)")
    first = g.node("DM_RouteExpert", 1, model=high["MODEL"], end=750.0, unit="timestep", cfg=0.0)
    both = g.node("DM_RouteExpert", 1, model=low["MODEL"], experts=first[0], end=0.0, unit="timestep", cfg=0.0)
    routed = g.node("DM_RoutedModel", 2, experts=both[0], memory_mode="resident")
    sample_and_save(g, 3, routed[0], high["CLIP"], high["VAE"], "routing_two_experts", "a yellow pullover")


REFINER_NOTE = """\
A base model → a refiner for the last 20 % of sampling, with a cfg and prompts per expert, in ONE sampler: \
SDXL's base + refiner recipe.

1. The base serves sampling from the start to 80 % ("percent" 0.8: the last 20 % of noise is left); the \
refiner serves the rest with its own cfg (5) and its own prompts (connected to its Route Expert). Here the \
refiner is the mini family's low-noise range expert (expert-000-250: base + a LoRA trained on the cleanest \
timesteps), which is what SDXL's refiner is too.

2. "Routed Guider" feeds SamplerCustomAdvanced; the scheduler's steps and type set where each step lands.

Real SDXL: replace the two Load Mini Model nodes by Load Checkpoint with sd_xl_base_1.0 and \
sd_xl_refiner_1.0, use CLIPTextEncodeSDXL for the base's prompts and CLIPTextEncodeSDXLRefiner for the \
refiner's, make the latent 1024×1024 and the base cfg about 7. memory_mode "sequential" keeps only one of the \
two large models in VRAM at a time.
"""


def routing_sdxl_refiner(g: Graph) -> None:
    """Base → refiner at 20 % noise through the routed guider, with a cfg and prompts per expert."""
    g.note(REFINER_NOTE, column=0, size=(400, 520))
    base = mini(g, 0, "base", "Base (SDXL base in real use)")
    refiner = mini(g, 0, "expert-000-250", "Refiner (SDXL refiner in real use)")
    prompts = {
        label: text_prompts(g, 1, loader["CLIP"], "a magenta coat", label)
        for label, loader in (("base", base), ("refiner", refiner))
    }
    first = g.node("DM_RouteExpert", 2, model=base["MODEL"], end=0.8, unit="percent", cfg=0.0)
    both = g.node(
        "DM_RouteExpert",
        2,
        model=refiner["MODEL"],
        experts=first[0],
        end=1.0,
        unit="percent",
        cfg=5.0,
        positive=prompts["refiner"][0],
        negative=prompts["refiner"][1],
    )
    guider = g.node(
        "DM_RoutedGuider",
        3,
        experts=both[0],
        positive=prompts["base"][0],
        negative=prompts["base"][1],
        cfg=CFG,
        memory_mode="sequential",
    )
    sampler = g.node("KSamplerSelect", 3, sampler_name="dpmpp_2m")
    sampled = sample_custom(g, 3, guider[0], sampler[0], base["MODEL"], ("karras", 25))
    decode_and_save(g, 5, sampled, refiner["VAE"], "routing_sdxl_refiner")


WAN22_NOTE = """\
Wan 2.2 A14B text-to-video: the high-noise expert, then the low-noise expert, as ONE model in ONE KSampler.

As shipped it runs on two TINY Wan experts built into the pack ("Load Demo Wan Expert": Wan's architecture \
with random weights, so the video is noise) — the pack's garment models are not Wan models. The graph is \
Wan 2.2's own recipe; for real use:

1. Put wan2.2_t2v_high_noise_14B_fp8_scaled and wan2.2_t2v_low_noise_14B_fp8_scaled into \
models/diffusion_models, umt5_xxl_fp8_e4m3fn_scaled into models/text_encoders and wan_2.1_vae into models/vae \
(ComfyUI's Wan 2.2 files). Replace "Load Demo Wan Expert (high noise)" by a Load Diffusion Model (UNETLoader) \
with the high-noise file and "… (low noise)" by one with the low-noise file, each feeding its Shift node; add \
a Load CLIP (type wan, umt5) for both prompts and a Load VAE (wan_2.1_vae) for VAE Decode. Set the latent to \
640×640, 81 frames.

2. Each expert gets its own ModelSamplingSD3 (shift 8) BEFORE routing, as in ComfyUI's own Wan 2.2 template.

3. The first Route Expert serves σ above 0.875 (Wan 2.2's boundary for text-to-video; "timestep" 875 is the \
same), the second everything below. With euler / simple / 20 steps / shift 8 that is steps 1–11 high, 12–20 \
low: the canvas under "Routed Model" shows it.

4. The KSampler runs all 20 steps at cfg 3.5. This equals ComfyUI's two-KSamplerAdvanced recipe (high: steps \
0→11 with leftover noise; low: 11→end, no new noise) for euler, with no hand-off to get wrong; multistep \
samplers keep their history across the switch. memory_mode "sequential" keeps one 14B expert in VRAM at a \
time. The frames are saved as an animated WEBP (for an MP4 use CreateVideo + SaveVideo).
"""
WAN_NEGATIVE = "blurry, low quality, static, still picture, worst quality, jpeg artifacts, deformed, extra fingers"


def routing_wan22(g: Graph) -> None:
    """Wan 2.2 A14B's recipe: two experts, ModelSamplingSD3 shift 8 on each, routed at σ 0.875, one KSampler."""
    g.note(WAN22_NOTE, column=0, size=(420, 760))
    experts, loaders = [], {}
    for label in ("high", "low"):
        loaders[label] = g.node(
            "DM_DemoWanLoader", 0, title=f"Load Demo Wan Expert ({label} noise)", expert=f"{label}_noise", seed=0
        )
        model = loaders[label]["MODEL"]
        experts.append(g.node("ModelSamplingSD3", 1, title=f"Shift ({label} noise)", model=model, shift=8.0)[0])
    clip, vae = loaders["high"]["CLIP"], loaders["high"]["VAE"]
    text = "a red fox running through fresh snow in a pine forest, morning light, tracking shot"
    positive = g.node("CLIPTextEncode", 1, title="Positive prompt", size=(400, 160), clip=clip, text=text)
    negative = g.node("CLIPTextEncode", 1, title="Negative prompt", size=(400, 160), clip=clip, text=WAN_NEGATIVE)
    first = g.node(
        "DM_RouteExpert", 2, title="High noise: σ > 0.875", model=experts[0], end=0.875, unit="sigma", cfg=0.0
    )
    both = g.node(
        "DM_RouteExpert",
        2,
        title="Low noise: the rest",
        model=experts[1],
        experts=first[0],
        end=0.0,
        unit="sigma",
        cfg=0.0,
    )
    preview = {"σ preview model": "flow", "σ preview shift": 8.0}  # the editor's σ preview before the first run
    routed = g.node("DM_RoutedModel", 3, size=(360, 230), properties=preview, experts=both[0], memory_mode="sequential")
    latent = g.node("EmptyHunyuanLatentVideo", 3, width=64, height=64, length=1, batch_size=1)
    sampled = g.node(
        "KSampler",
        4,
        model=routed[0],
        positive=positive[0],
        negative=negative[0],
        latent_image=latent[0],
        seed=42,
        steps=20,
        cfg=3.5,
        sampler_name="euler",
        scheduler="simple",
        denoise=1.0,
    )
    frames = g.node("VAEDecode", 5, samples=sampled[0], vae=vae)
    g.node(
        "SaveAnimatedWEBP",
        5,
        size=(360, 400),
        images=frames[0],
        filename_prefix="diffusion_merge/wan22_routed",
        fps=16.0,
        lossless=False,
        quality=90,
        method="default",
    )


# -- SuperDiff ----------------------------------------------------------------------------------------

SUPERDIFF_AND_NOTE = f"""\
SuperDiff AND: pictures that are BOTH prompts at once — here "sneaker" AND "red" (the paper's example is \
"a flamingo" AND "a candy cane").

SuperDiff (Skreta et al., ICLR 2025) runs the reverse SDE of several components together and, at every step, \
weights their scores (κ) so that the picture stays equally likely under each component — estimated on the fly \
with the Itô density estimator, no training. The mini family learnt "sneaker" and "red" as separate captions, \
so AND can be checked: the pictures should be red sneakers.

1. Each "SuperDiff Component" is a model + prompt (+ negative, cfg); chain more for N > 2.
2. "SuperDiff KSampler" hides the guider and sampler: mode AND = equal density, OR = a mixture (each sample \
picks one component). It needs many small stochastic steps (100 by default); the κ trace is drawn on the node.
3. kappa_clamp (0 = off, the reference behaviour) bounds κ if AND gets unstable.

{swap_text("one model for both components")}
"""


def superdiff_and_concepts(g: Graph) -> None:
    """SuperDiff AND of two prompts on one model ("sneaker" AND "red"), all-in-one node."""
    g.note(SUPERDIFF_AND_NOTE, column=0, size=(400, 600))
    loader = mini(g, 0, "base", "Model")
    clip = loader["CLIP"]
    garment = g.node("CLIPTextEncode", 1, title="Concept 1", size=(320, 110), clip=clip, text="sneaker")
    colour = g.node("CLIPTextEncode", 1, title="Concept 2", size=(320, 110), clip=clip, text="red")
    empty = g.node("CLIPTextEncode", 1, title="Negative", size=(320, 110), clip=clip, text="")
    first = g.node("DM_SuperDiffComponent", 2, model=loader["MODEL"], positive=garment[0], negative=empty[0], cfg=CFG)
    both = g.node(
        "DM_SuperDiffComponent",
        2,
        model=loader["MODEL"],
        positive=colour[0],
        components=first[0],
        negative=empty[0],
        cfg=CFG,
    )
    sampled = g.node(
        "DM_SuperDiffKSampler",
        3,
        size=(360, 420),
        components=both[0],
        latent_image=empty_latent(g, 2),
        seed=1,
        steps=100,
        scheduler="normal",
        denoise=1.0,
        mode="AND",
        temperature=1.0,
        bias="",
        kappa_clamp=0.0,
        and_epsilon=0.0,
        flow_sigma_max=0.995,
    )
    decode_and_save(g, 4, sampled[0], loader["VAE"], "superdiff_and")


SUPERDIFF_OR_NOTE = f"""\
SuperDiff OR: model A OR model B — each picture is drawn from the mixture of two models.

With mode OR, κ = softmax(T·log q + bias) follows the component under which the sample is more likely, so each \
picture commits to one model's distribution (bias in nats sets the mixture weights, e.g. "0, -1"). Here A is \
the mini family's fine-tune on garments 0–4 (t-shirt, trousers, pullover, dress, coat) and B the one on 5–9 \
(sandal, shirt, sneaker, bag, ankle boot), both asked for "green": the pictures come from both halves.

This is the modular form: SuperDiff Guider + SuperDiff Sampler in SamplerCustomAdvanced; "SuperDiff Trace" \
plots κ and the log-densities of the last run. Both models must share a latent format.

{swap_text("model A and model B, e.g. two SD 1.5 fine-tunes")}
"""


def superdiff_or_models(g: Graph) -> None:
    """SuperDiff OR of two models through the modular guider + sampler, with the trace plot."""
    g.note(SUPERDIFF_OR_NOTE, column=0, size=(400, 560))
    components, first_loader = None, None
    for label, variant in (("A", "a"), ("B", "b")):
        loader = mini(g, 0, variant, f"Model {label} (garments {'0–4' if variant == 'a' else '5–9'})")
        first_loader = first_loader or loader
        positive, negative = text_prompts(g, 1, loader["CLIP"], "green", label)
        chain = {"components": components} if components is not None else {}
        components = g.node(
            "DM_SuperDiffComponent", 2, model=loader["MODEL"], positive=positive, negative=negative, cfg=CFG, **chain
        )[0]
    guider = g.node("DM_SuperDiffGuider", 3, components=components)
    sampler = g.node(
        "DM_SuperDiffSampler",
        3,
        mode="OR",
        temperature=1.0,
        bias="0, 0",
        kappa_clamp=0.0,
        and_epsilon=0.0,
        flow_sigma_max=0.995,
    )
    sampled = sample_custom(g, 3, guider[0], sampler[0], first_loader["MODEL"], ("normal", 100))
    g.node("DM_SuperDiffTrace", 5, size=(360, 300), guider=guider[0], latent=sampled)
    decode_and_save(g, 5, sampled, first_loader["VAE"], "superdiff_or")


WORKFLOWS: dict[str, Callable[[Graph], None]] = {
    "mini_family": mini_family,
    "task_vectors": task_vectors,
    "lora_extract": lora_extract,
    **{name: merge_workflow(name) for name in MERGE_METHODS},
    "merge_block_weights": merge_block_weights,
    "recipe_rerun": recipe_rerun,
    "deme_merge": deme_merge,
    "routing_two_experts": routing_two_experts,
    "routing_wan22": routing_wan22,
    "routing_sdxl_refiner": routing_sdxl_refiner,
    "deme_ensemble": deme_ensemble,
    "deme_train": deme_train,
    "superdiff_and_concepts": superdiff_and_concepts,
    "superdiff_or_models": superdiff_or_models,
}
