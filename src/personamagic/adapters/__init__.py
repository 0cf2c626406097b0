"""Plug-ins that add to PersonaMagic's conditioning: an IP-Adapter's image tokens (`ip_adapter`),
PhotoMaker v1's ID embedding fused into the concept token's embedding (SDXL): the official parts in
`photomaker` (ID encoder, weights file, UNet LoRA), plugged into PersonaMagic in `photomaker_plugin`.
Each is imported only where it is used; this package imports nothing.
"""
