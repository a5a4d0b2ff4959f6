"""The front half of the q4 backend, before the passes: what Dynamo hands over, read (`capture`),
made ATen IR and frozen (`normalize`), calibrated with statistics kept in a `CalibrationCache`
(`calibrate`), all in one call (`prepare`); and the saved-artifact file format the backend reads
instead of calibrating (`saved_artifact`). Imports the algorithms, the core and the kernels."""
