"""Model loading and runtimes: SigLIP and BLIP wrappers, backends, the tiny and trained model kits."""
