"""Block: the global scheduler, predictor side-cars, engines, benchmark client and provisioning."""
