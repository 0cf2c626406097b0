"""PhotoMaker v1 (Li et al., "PhotoMaker: Customizing Realistic Human Photos via Stacked ID Embedding",
CVPR 2024) as a plug-in for SDXL: its ID encoder (`encoder`), its weights file (`weights`) and its UNet
LoRA (`lora`). This package owns the self-contained part; plugging it into PersonaMagic is
`adapters.photomaker_plugin`'s, wiring it into an SDXL pipeline is the pipeline's job.

Here the concept token S* plays PhotoMaker's class word: PhotoMaker's ID embedding of the photo is
fused into S*'s prompt embedding.

What the official release does (TencentARC/PhotoMaker, Apache-2.0: `photomaker/model.py`, unchanged
since the v1 release; `photomaker/pipeline.py` in its last v1-only version; `README.md`,
`gradio_demo/app.py`, `requirements.txt`, `feature-extractor/preprocessor_config.json`):

- **ID encoder.** A `CLIPVisionModelWithProjection` with the CLIP ViT-L/14 sizes (hidden 1024, MLP
  4096, 24 layers, 16 heads, patch 14, image 224, quick-GELU, projection 1024 -> 768 without bias),
  plus `visual_projection_2` (1024 -> 1280, no bias) and a `fuse_module`. Each ID image goes through
  the vision tower; its pooled output (the CLS token after `post_layernorm`) goes through both
  projections and the two are concatenated: one 768 + 1280 = 2048-wide ID embedding per image, as
  wide as SDXL's prompt embeddings (the two text encoders' 768 + 1280). ID images arrive as
  `(B, N, 3, 224, 224)`, N photos of one person, preprocessed by a default `CLIPImageProcessor`
  (shortest edge 224, bicubic, center crop 224, OpenAI CLIP mean/std).
- **Fuse module.** `fuse_module.mlp1` is an MLP(in 4096 -> hidden 2048 -> out 2048, no residual) on
  [class-token prompt embedding ; ID embedding]; its output plus the class-token embedding goes
  through `fuse_module.mlp2`, an MLP(2048 -> 2048 -> 2048) with a residual, then through
  `fuse_module.layer_norm`. Each MLP is `layernorm` (LayerNorm of its input) -> `fc1` -> exact GELU
  -> `fc2` (-> + input when residual). The result is written back with `masked_scatter_` at the
  positions `class_tokens_mask` marks; every other position is untouched. (The official fuse counts
  the marks over the whole batch, so it serves one prompt at a time; here each row has its own.)
- **Weights.** `photomaker-v1.bin` on the hub repo `TencentARC/PhotoMaker`, a `torch.save` of
  `{"id_encoder": {...}, "lora_weights": {...}}` (the official loader refuses any other top-level
  keys). `id_encoder` is the encoder's `state_dict()`: `vision_model.*` and `visual_projection.weight`
  (transformers' CLIP names, incl. the `pre_layrnorm` spelling), `visual_projection_2.weight`,
  `fuse_module.{mlp1,mlp2}.{layernorm,fc1,fc2}.{weight,bias}`, `fuse_module.layer_norm.{weight,bias}`;
  it is loaded with `load_state_dict(strict=True)` (transformers 4.36.2, whose CLIP `position_ids`
  buffer is not persistent, so the file has none). `lora_weights` is a UNet LoRA in diffusers' old
  attention-processor format, `unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight`
  (e.g. `unet.down_blocks.2.attentions.0.transformer_blocks.2.attn1.processor.to_k_lora.down.weight`),
  on `attn1` and `attn2` of the transformer blocks; the official pipeline applies it with
  `pipe.load_lora_weights(state_dict["lora_weights"], adapter_name="photomaker")` (diffusers' SDXL
  LoRA loader, peft backend) and its README then calls `pipe.fuse_lora()`.
- **Prompt.** The trigger word `img` is added to both tokenizers as a special token and must follow
  the class word ("a man img ..."); exactly one per prompt. The token before it is the class word
  (one token); the trigger is dropped and the class token is repeated once per ID image, and those
  N positions are `class_tokens_mask`. The k-th copy receives the k-th image's ID embedding (the
  "stacked ID embedding"). What is fused is the concatenated 2048-wide `prompt_embeds` (penultimate
  hidden states of both text encoders); the pooled embedding and the negative prompt are not fused.
- **Delayed merge.** A second, text-only prompt (the trigger removed, the class word once) is encoded
  too; denoising step `i` uses the text-only embeddings while `i <= start_merge_step` and the fused
  ones after. The demo sets `start_merge_step = int(style_strength_ratio / 100 * steps)`, capped at
  30: 10 of 50 steps at its default strength 20, the README's example value.

Not recoverable from the weights, hence fixed here: the attention head count (q/k/v weights are
hidden x hidden whatever the heads), taken as 64-wide heads like every CLIP ViT (ViT-L/14: 16).
"""

HUB_REPO = "TencentARC/PhotoMaker"  # the official v1 weights
WEIGHTS_NAME = "photomaker-v1.bin"  # the weights file in HUB_REPO
TRIGGER_WORD = "img"  # the official pipeline's default trigger word (it follows the class word)
