"""What the shipped examples draw, run as shipped in a real ComfyUI server on the committed mini family, read by
the committed classifier: one end-to-end check per feature (task vectors, merging, routing, SuperDiff, training).

Seeds are fixed, so each check is deterministic on one machine; the thresholds leave room for the small
numerical differences between torch builds. Sampling a few 32×32 pictures takes seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from diffusion_merge.merging import family_data as data
from diffusion_merge.merging import family_metrics as metrics

pytestmark = pytest.mark.server

PACK_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = PACK_ROOT / "example_workflows"
CLASSIFIER = PACK_ROOT / "mini_models" / "classifier.safetensors"


@pytest.fixture(scope="module")
def classifier():
    return metrics.load_classifier(CLASSIFIER)


@pytest.fixture(scope="module")
def pictures(server, object_info, workflows, comfy_server):
    """``pictures(name)`` → {title of each saving node (or its id): [N, 3, 32, 32] pictures in [0, 1]};
    ``pictures(name, batch=B, **inputs)`` runs it with B pictures and the inputs of the node types named
    (e.g. ``DM_MergeTIES={"lam": 0.0}``) changed."""
    done: dict[str, dict[str, torch.Tensor]] = {}

    def run(name: str, batch: int | None = None, **changes: dict) -> dict[str, torch.Tensor]:
        key = json.dumps([name, batch, changes], sort_keys=True)
        if key in done:
            return done[key]
        workflow = json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))
        prompt = workflows.workflow_to_prompt(workflow, object_info)
        assert not workflows.needs_demo_models(prompt), f"{name} must run as shipped"
        for node in prompt.values():
            node["inputs"].update(changes.get(node["class_type"], {}))
            if batch and node["class_type"] == "EmptyLatentImage":
                node["inputs"]["batch_size"] = batch
        entry = server.wait(server.post_prompt(prompt), timeout=300)
        error = comfy_server.execution_error(entry)
        assert entry["status"]["status_str"] == "success", json.dumps(error, indent=1)[:3000]
        titles = {str(node["id"]): node.get("title", "") for node in workflow["nodes"]}
        found = {}
        for node_id, ui in entry["outputs"].items():
            files = [i for i in ui.get("images") or [] if i.get("type") == "output" and i["filename"].endswith(".png")]
            if files:
                label = titles.get(node_id, "").removeprefix("Save: ") or node_id
                paths = [server.output_dir / image["subfolder"] / image["filename"] for image in files]
                found[label] = torch.stack([read_picture(path) for path in paths])
        done[key] = found
        return found

    return run


def read_picture(path: Path) -> torch.Tensor:
    return torch.from_numpy(numpy.asarray(Image.open(path).convert("RGB"), dtype=numpy.float32) / 255).movedim(-1, 0)


def only(found: dict[str, torch.Tensor]) -> torch.Tensor:
    (images,) = found.values()
    return images


def share_in(classifier, images: torch.Tensor, classes) -> float:
    predicted = metrics.predict(classifier, images).classes
    return float(torch.isin(predicted, torch.tensor(sorted(classes))).float().mean())


def colour_share(images: torch.Tensor, colour: str) -> float:
    return metrics.colour_accuracy(images, torch.full((len(images),), data.COLOUR_NAMES.index(colour)))


TOPS_AND_FOOTWEAR = set(data.CLASS_GROUPS["tops"]) | set(data.CLASS_GROUPS["footwear"])


def test_mini_family_example_draws_red_sneakers(pictures, classifier):
    images = only(pictures("mini_family"))
    assert images.shape == (8, 3, 32, 32)
    assert share_in(classifier, images, {data.CLASS_NAMES.index("sneaker")}) >= 0.75
    assert colour_share(images, "red") >= 0.75


def test_task_vector_example_moves_the_base_towards_the_fine_tune(pictures, classifier):
    found = pictures("task_vectors")
    footwear = set(data.CLASS_GROUPS["footwear"])
    base = share_in(classifier, found["the base"], footwear)
    applied = share_in(classifier, found["base + half the task vector"], footwear)
    assert applied >= base + 0.25, f"footwear share: base {base:.2f}, base + 0.5 τ {applied:.2f}"
    assert colour_share(found["base + half the task vector"], "cyan") >= 0.75


@pytest.mark.parametrize(
    ("name", "node"), [("merge_task_arithmetic", "DM_MergeTaskArithmetic"), ("merge_ties", "DM_MergeTIES")]
)
def test_merge_examples_draw_both_fine_tunes_groups(name, node, pictures, classifier):
    """The merge of the tops and footwear fine-tunes draws tops and shoes for "yellow" more often than the base
    does (the same example with λ = 0 is the base), 32 pictures each."""
    merged = only(pictures(name, batch=32))
    base = only(pictures(name, batch=32, **{node: {"lam": 0.0}}))
    shares = [share_in(classifier, images, TOPS_AND_FOOTWEAR) for images in (merged, base)]
    assert shares[0] >= 0.8 and shares[0] >= shares[1] + 0.1, (
        f"tops and shoes: merged {shares[0]:.2f}, base {shares[1]:.2f}"
    )
    for group in ("tops", "footwear"):
        assert share_in(classifier, merged, data.CLASS_GROUPS[group]) >= 0.2, f"the merge lost the {group}"
    assert colour_share(merged, "yellow") >= 0.75


def test_lora_extract_example_stays_close_to_the_fine_tune(pictures, classifier):
    found = pictures("lora_extract")
    tuned = metrics.predict(classifier, found["the fine-tune"]).classes
    lora = metrics.predict(classifier, found["base + rank-16 LoRA"]).classes
    assert float((tuned == lora).float().mean()) >= 0.6, f"fine-tune {tuned.tolist()} vs LoRA {lora.tolist()}"


def test_routing_example_draws_the_prompted_garment(pictures, classifier):
    images = only(pictures("routing_two_experts"))
    assert share_in(classifier, images, {data.CLASS_NAMES.index("pullover")}) >= 0.75


def test_superdiff_and_example_draws_both_concepts(pictures, classifier):
    images = only(pictures("superdiff_and_concepts"))
    sneakers = metrics.predict(classifier, images).classes == data.CLASS_NAMES.index("sneaker")
    red = metrics.colour_of(images).colour == data.COLOUR_NAMES.index("red")
    assert float((sneakers & red).float().mean()) >= 0.75


def test_superdiff_or_example_draws_from_both_models(pictures, classifier):
    images = only(pictures("superdiff_or_models"))
    from_a = share_in(classifier, images, data.CLASS_GROUPS["a"])
    assert 0 < from_a < 1, f"share of model A's garments: {from_a:.2f}; OR should mix both models"
    assert colour_share(images, "green") >= 0.75


def test_deme_training_example_moves_the_base_towards_its_data(pictures, classifier):
    """The example trains four experts for a few steps on red shoes captioned "red": merged and routed, they
    draw more shoes for "red" than the base does."""
    found = pictures("deme_train")
    footwear = set(data.CLASS_GROUPS["footwear"])
    base = share_in(classifier, found["the base"], footwear)
    for label in ("merged experts", "routed experts"):
        trained = share_in(classifier, found[label], footwear)
        assert trained > base, f"footwear share: base {base:.2f}, {label} {trained:.2f}"
