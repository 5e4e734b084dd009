"""The API model: Canal's InternalGateway, Istio networking objects and the Kubernetes objects they name."""

from canal.model.base import Caveat, FieldError, Meta, ObjectRef, Rejection

__all__ = ["Caveat", "FieldError", "Meta", "ObjectRef", "Rejection"]
