"""Shared by the tests of choices a dry run confirms."""


def first_dry_run_too_big(monkeypatch) -> list[int]:
    """Make the first dry run of the test report a peak no device holds; returns the chunk
    sizes of the dry runs made, in order."""
    import chunkflow.dryrun.layout as layout

    real, tried = layout.dry_run, []

    def dry_run(cfg, batches, gpu, **kw):
        report = real(cfg, batches, gpu, **kw)
        tried.append(cfg.chunking.chunk_size)
        if len(tried) == 1:
            report.roles[0].peak_device_bytes = 2**40
        return report

    monkeypatch.setattr(layout, "dry_run", dry_run)
    return tried
