"""The jobs a user runs: `personalize` (photos in, concept folder out), `generate` (concepts and
prompts in, PNGs with their parameters out), their pictures (`plots`); the CLI and the web UI call these."""
