"""canal.kube: the controller's side of the Kubernetes API (official client): informers, leader election, status
and Event writers. The translation stays pure in canal.translate; this package only moves objects in and out."""
