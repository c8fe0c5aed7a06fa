"""One module per revision, applied in order by `render-video migrate`."""
