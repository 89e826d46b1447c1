"""``python -m pgm_drm``: the ``pgm-drm`` command line (:mod:`pgm_drm.cli`)."""

from pgm_drm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
