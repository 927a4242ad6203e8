"""Workflows shared by the batch client's unit tests and its host tests: one txt2img graph of this pack's nodes
in API format, and the same kind of graph as the editor saves it (UI format) with the constructs its
conversion must handle: a seed control value, a PrimitiveNode, a Reroute, a muted and a bypassed node, a Note."""

CKPT = "tiny-sd3.5_large.safetensors"  # sd35_core.loading.tiny's Large-like checkpoint: 4 joint blocks, fast

SAMPLER = dict(seed=42, steps=4, cfg=4.5, sampler="euler", schedule="reference", shift=3.0, denoise=1.0,
               slg_layers="7,8,9", slg_scale=0.0, slg_start=0.01, slg_end=0.2, slg_window="steps")


def txt2img_api():
    """Our nodes, API format, with titles as the editor exports them."""
    def n(ct, title, **inputs):
        return {"class_type": ct, "inputs": inputs, "_meta": {"title": title}}
    return {
        "1": n("SD35CheckpointLoader", "Load Checkpoint", ckpt_name=CKPT, weight_dtype="default"),
        "2": n("SD35TextEncoderLoader", "Text Encoders", clip_l_name="clip_l.safetensors",
               clip_g_name="clip_g.safetensors", t5xxl_name="t5xxl_fp16.safetensors", device="default"),
        "3": n("SD35TextEncode", "Positive Prompt", clip=["2", 0], text="a cat"),
        "4": n("SD35TextEncode", "Negative Prompt", clip=["2", 0], text="blurry"),
        "5": n("SD35EmptyLatent", "Size", width=64, height=64, batch_size=1),
        "6": n("SD35Sampler", "Sampler", model=["1", 0], positive=["3", 0], negative=["4", 0], latent=["5", 0],
               **SAMPLER),
        "7": n("SD35VAEDecode", "Decode", samples=["6", 0], vae=["1", 2]),
        "8": n("SaveImage", "Save Image", images=["7", 0], filename_prefix="batch"),
    }


# ------------------------------------------------------------------------------------------------ UI format

class UIGraph:
    """Writes a workflow in the editor's saved format (nodes with slots and widgets_values, links table)."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, nid, type_, widgets=None, inputs=(), outputs=(), mode=0, title=None):
        node = {"id": nid, "type": type_, "pos": [nid * 10, 0], "size": [300, 100], "flags": {}, "order": nid,
                "mode": mode, "inputs": [], "outputs": [{"name": t.lower(), "type": t, "links": [], "slot_index": i}
                                                        for i, t in enumerate(outputs)],
                "properties": {"Node name for S&R": type_}}
        for name, t, *widget in inputs:
            slot = {"name": name, "type": t, "link": None}
            if widget:
                slot["widget"] = {"name": name}
            node["inputs"].append(slot)
        if widgets is not None:
            node["widgets_values"] = widgets
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src, slot, dst, input_name):
        lid = len(self.links) + 1
        s = next(n for n in self.nodes if n["id"] == src)
        d = next(n for n in self.nodes if n["id"] == dst)
        index = next(i for i, x in enumerate(d["inputs"]) if x["name"] == input_name)
        t = s["outputs"][slot]["type"]
        self.links.append([lid, src, slot, dst, index, t])
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][index]["link"] = lid

    def workflow(self):
        return {"last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_txt2img(sampler_mode=0, slg_layers="7,8,9", ckpt=CKPT):
    """The editor's saved form of a txt2img graph (see the module docstring for what it contains)."""
    g = UIGraph()
    g.node(1, "SD35CheckpointLoader", [ckpt, "default"], outputs=["SD35_MODEL", "SD35_CLIP", "SD35_VAE"])
    g.node(2, "SD35TextEncoderLoader", ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors",
                                        "default", "default"], outputs=["SD35_CLIP"])
    g.node(3, "SD35TextEncode", ["a cat", "", "", "", 77], [("clip", "SD35_CLIP")], ["CONDITIONING"],
           title="Positive")
    g.node(4, "SD35TextEncode", ["blurry", "", "", "", 77], [("clip", "SD35_CLIP")], ["CONDITIONING"],
           title="Negative")
    g.node(5, "SD35EmptyLatent", [64, 48, 1], [("model", "SD35_MODEL")], ["LATENT"])
    # The sampler's widgets_values hold the seed's control-after-generate value right after the seed.
    g.node(6, "SD35Sampler", [42, "randomize", 20, 4.5, "euler", "reference", 3.0, 1.0, slg_layers, 2.5, 0.01, 0.2,
                              "steps", "batch"],
           [("model", "SD35_MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
            ("latent", "LATENT"), ("steps", "INT", True)], ["LATENT"], mode=sampler_mode, title="Sampler")
    g.node(7, "SD35VAEDecode", [False, 512, 64], [("samples", "LATENT"), ("vae", "SD35_VAE")], ["IMAGE"])
    g.node(8, "Reroute", None, [("", "*")], ["IMAGE"])
    g.node(9, "SaveImage", ["batch"], [("images", "IMAGE")], title="Final")
    g.node(10, "SaveImage", ["muted"], [("images", "IMAGE")], mode=2)
    g.node(11, "SD35ControlNetApply", [1.0, 0.0, 1.0, "auto", "off"],
           [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("control_net", "SD35_CONTROLNET"),
            ("vae", "SD35_VAE"), ("image", "IMAGE")], ["CONDITIONING", "CONDITIONING"], mode=4)
    g.node(12, "PrimitiveNode", [3, "fixed"], outputs=["INT"])
    g.node(13, "LoadImage", ["canny.png", "image"], outputs=["IMAGE", "MASK"])
    g.node(14, "Note", ["Put the tiny checkpoint in models/checkpoints."])
    g.link(2, 0, 3, "clip")
    g.link(2, 0, 4, "clip")
    g.link(3, 0, 11, "positive")
    g.link(4, 0, 11, "negative")
    g.link(1, 2, 11, "vae")
    g.link(13, 0, 11, "image")
    g.link(11, 0, 6, "positive")
    g.link(11, 1, 6, "negative")
    g.link(1, 0, 6, "model")
    g.link(5, 0, 6, "latent")
    g.link(12, 0, 6, "steps")
    g.link(6, 0, 7, "samples")
    g.link(1, 2, 7, "vae")
    g.link(7, 0, 8, "")
    g.link(8, 0, 9, "images")
    g.link(7, 0, 10, "images")
    return g.workflow()
