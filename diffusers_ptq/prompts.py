"""Calibration prompts for the text-to-image families (SD3/SD3.5, FLUX.1, PixArt): the bundled default set and the
check every prompt list passes. Written by the project: varied subjects (people, animals, objects, food, places,
vehicles, plants, text in images), styles (photograph, painting, illustration, 3D render, sketch, pixel art),
lighting, framing and prompt lengths (a few words to a long paragraph), because calibration statistics should cover
what users ask for, not one kind of picture.
"""

from __future__ import annotations

from collections.abc import Sequence

CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse on the moon",
    "a red fox sitting in fresh snow, morning light, telephoto lens",
    "an oil painting of a stormy sea with a small sailing boat",
    "a bowl of ramen with a soft boiled egg, overhead shot, studio lighting",
    "portrait of an elderly woman with silver hair, soft window light, 85mm",
    "a cyberpunk city street at night, neon signs reflected in puddles",
    "a watercolor illustration of a lighthouse on a cliff",
    "a cute corgi wearing sunglasses on a beach",
    "isometric 3D render of a tiny cozy bedroom, pastel colors",
    "a pencil sketch of an old oak tree",
    "a vintage red sports car parked in front of a diner, 1960s",
    "macro photo of a dew drop on a green leaf",
    "a medieval castle on a hill above a misty valley at sunrise",
    "a chalkboard with the words 'hello world' written in white chalk",
    "pixel art of a knight fighting a dragon",
    "a plate of sushi on a black slate, shallow depth of field",
    "an abstract painting with bold geometric shapes in primary colors",
    "a golden retriever puppy playing in autumn leaves",
    "the interior of a gothic cathedral with stained glass windows",
    "a bustling outdoor market in Marrakech, vivid spices, afternoon sun",
    "a minimalist poster of a mountain range, flat design",
    "an owl perched on a branch under a full moon",
    "a steaming cup of coffee on a wooden table next to an open book",
    "a futuristic spaceship landing in a desert, cinematic, wide angle",
    "a child blowing bubbles in a park, candid photo",
    "a bouquet of sunflowers in a blue ceramic vase",
    "a snowy mountain cabin with warm light in the windows, twilight",
    "an anime style girl with a red umbrella in the rain",
    "a close-up of a hummingbird drinking nectar from a flower",
    "a neon sign that says 'OPEN 24 HOURS'",
    "an ancient Greek marble statue in a museum, dramatic lighting",
    "a tropical beach with palm trees and turquoise water, aerial view",
    "a steampunk mechanical owl made of brass gears",
    "a chef tossing vegetables in a flaming wok",
    "a black and white photograph of a jazz musician playing saxophone",
    "a field of lavender in Provence at golden hour",
    "a robot reading a newspaper in a cafe",
    "a glass of red wine on a balcony overlooking the sea at sunset",
    "children's book illustration of a bear having a picnic with a rabbit",
    "a busy Tokyo crossing seen from above, long exposure",
    "a detailed map of a fantasy island, parchment texture",
    "a stack of pancakes with blueberries and maple syrup",
    "a tiger walking through tall grass, National Geographic photo",
    "a lone tree on a hill under a starry night sky, milky way",
    "an art deco building facade in Miami, pastel colors",
    "a kitten sleeping in a cardboard box",
    "a surreal landscape with melting clocks in the style of a dreamlike painting",
    "a woman in a yellow raincoat walking through a foggy forest",
    "a hot air balloon festival over green hills",
    "a logo of a coffee shop with a cat and the text 'Purr Brew'",
    "an underwater coral reef with colorful fish and sun rays",
    "a rustic loaf of sourdough bread on a linen cloth",
    "a knight in shining armor standing in a field of poppies",
    "a modern living room with large windows and indoor plants, architectural photography",
    "a chameleon on a branch, vibrant colors, macro",
    "an old train crossing a stone bridge in the mountains, steam rising",
    "a fantasy wizard casting a spell, glowing runes, digital art",
    "a bicycle leaning against a brick wall with ivy",
    "a polar bear on an ice floe under the northern lights",
    "a close-up portrait of a man with a beard, studio lighting, high detail",
    "a street food stall in Bangkok at night",
    "a paper origami crane on a white background",
    "a volcano erupting at night with lava flowing into the ocean",
    "a quiet Japanese garden with a koi pond and a red bridge",
)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A prompt list as a list of strings; a ValueError naming the problem if it is empty, a single string, or
    holds anything but strings."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError(f"calibration_prompts must be a list of strings, got one string {prompts!r}: wrap it in a "
                         "list")
    if not hasattr(prompts, "__iter__"):
        raise ValueError(f"calibration_prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibration_prompts is empty: give at least one prompt, or None for the bundled set")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"calibration_prompts must hold strings only; got {[type(p).__name__ for p in bad][:5]}")
    return prompts


def cycle_prompts(prompts: Sequence[str] | None, num_samples: int) -> list[str]:
    """num_samples prompts cycling through `prompts` (None: CALIBRATION_PROMPTS)."""
    prompts = check_prompts(CALIBRATION_PROMPTS if prompts is None else prompts)
    return [prompts[i % len(prompts)] for i in range(num_samples)]
