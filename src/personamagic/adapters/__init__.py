"""Plug-ins that add to PersonaMagic's conditioning: an IP-Adapter's image tokens (`ip_adapter`),
PhotoMaker v1's ID embedding fused into the concept token's embedding (`photomaker`, SDXL). Each
lives in its own module and is imported only where it is used; this package imports nothing.
"""
