"""What tests share, so that no test imports another test module: the in-memory doubles of the controller's world
(doubles), bundles, model servers (serving), the rollout stacks and their walks (rollout, stack, walk), the router's
stand-ins (router), the Kubernetes control plane and its helpers (cluster, kube), the chart (chart), podman (pod),
PostgreSQL (postgres), retraining (retrain), alerting (alerts), PromQL checks (dashboard) and sockets."""
