"""The demo recipes: the DRM section, and the printed report."""

from pgm_drm.experiments.demo import format_demo_report, run_drm_demo


def test_drm_demo_section(tmp_path):
    report = run_drm_demo(tmp_path, n_images=20, n_probe=40)
    # the default DRM's classes are well separated at sigma 0.25 (100% measured)
    assert report["map_class_accuracy"] > 0.9
    assert report["activity_images_own_class"]
    for name in ("samples", "reconstructions", "activity", "probes"):
        assert (tmp_path / f"drm_{name}.png").exists()


def test_format_demo_report(tmp_path):
    site = {
        "max_abs_delta_log_marginal": 2.4e-14,
        "map_agreement_with_numpyro": 1.0,
        "map_equals_true_latent": 0.955,
    }
    sr = {
        "sites": {"c": site},
        "max_abs_delta_log_z": 1.4e-14,
        "seconds_per_image_kernel": 2e-5,
        "seconds_per_image_enumerate_exact": 8e-3,
        "speedup": 400.0,
    }
    report = {
        "model": {"classes": 3},
        "n_images": 200,
        "n_reference_images": 25,
        "schedule": "tree",
        "semirings": {"sum": sr},
        "ms_rmc_accuracy": 0.955,
    }
    lines = format_demo_report(report, tmp_path).splitlines()
    assert lines[0] == (
        "Rendering model {'classes': 3}, 200 images, schedule 'tree', compared on 25"
    )
    assert lines[3].split() == [
        "sum", "c", "2.40e-14", "100%", "96%", "2.00e-05", "8.00e-03", "400x"
    ]  # fmt: skip
    assert lines[4].split() == ["sum", "logZ", "1.40e-14"]
    assert lines[5] == "MS-RMC (Eq. 6) accuracy on the true class: 95.5%"
    assert lines[-1].startswith(f"wrote {tmp_path}/report.json")
    assert not any(line.startswith("DRM") for line in lines)
    report["drm"] = {
        "image_shape": [24, 24],
        "levels": 3,
        "images_per_second": 1000.0,
        "map_class_accuracy": 1.0,
        "activity_images_own_class": True,
        "probe_accuracy": {"c": [0.5, 1.0]},
    }
    lines = format_demo_report(report, tmp_path).splitlines()
    assert lines[-3].startswith("DRM 24x24, 3 levels: DCN-form max-sum pass 1000")
    assert lines[-2] == "layer probes (pixels .. class scores): c 0.50 1.00"
