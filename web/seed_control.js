// DreamForge Upscale: the seed control of a node whose seed a GAN run ignores starts at "fixed".
//
// ComfyUI's cache key holds every widget value, so a seed the frontend randomises after each queue reruns
// the node even when the seed cannot change its result (Tiled Upscale on a GAN, Chain-of-Zoom with a GAN and
// no prompt model). The server cannot set the control's starting value (the frontend always starts it at
// "randomize"), and dropping the control would shift the widget values of every saved workflow, so this
// extension only sets the starting value of a node as it is created. A loaded or pasted node then takes the
// value saved with it; the user can still pick randomize. SDX4 Upscale, whose seed always matters, keeps
// the frontend's default.
import { app } from "../../scripts/app.js";

const SEED_IGNORED_BY_A_GAN = new Set([
  "DreamForgeTiledUpscale", "DreamForgeCoZStep", "DreamForgeCoZLoop", "DreamForgeCoZUpscale",
]);

app.registerExtension({
  name: "DreamForge.SeedControlStartsFixed",
  nodeCreated(node) {
    if (!SEED_IGNORED_BY_A_GAN.has(node.comfyClass)) return;
    const seed = node.widgets?.find((w) => w.name === "seed");
    const controls = seed?.linkedWidgets?.length ? seed.linkedWidgets
      : (node.widgets ?? []).filter((w) => w.name === "control_after_generate");
    for (const control of controls) {
      if (control.options?.values?.includes("fixed")) control.value = "fixed";
    }
  },
});
