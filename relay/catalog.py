"""Public model names -> ordered upstream candidates, and their prices.

A `Catalog` is an immutable picture of providers, routes and prices, loaded in one
go from the database and swapped whole when the configuration generation moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.models import ModelRoute, Provider
from relay.provider_keys import resolve_provider_key
from usage.models import Price
from usage.pricing import PriceInfo


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    id: int
    name: str
    base_url: str
    api_key: str = field(repr=False)
    timeout_s: float


@dataclass(frozen=True, slots=True)
class RouteInfo:
    name: str
    provider: ProviderInfo
    upstream_model: str
    fallbacks: tuple[str, ...]
    max_output_tokens: int | None


@dataclass(frozen=True, slots=True)
class Candidate:
    """One upstream to try: the public name it serves and the model to ask for."""

    public_name: str
    route: RouteInfo
    upstream_model: str

    @property
    def provider(self) -> ProviderInfo:
        return self.route.provider


@dataclass(frozen=True)
class Catalog:
    generation: int
    routes: dict[str, RouteInfo]
    # (prefix, route) for names like "router/*", longest prefix first.
    wildcards: tuple[tuple[str, RouteInfo], ...]
    prices: dict[str, tuple[PriceInfo, ...]]

    def resolve(self, name: str) -> Candidate | None:
        route = self.routes.get(name)
        if route is not None:
            return Candidate(name, route, route.upstream_model)
        for prefix, route in self.wildcards:
            if name.startswith(prefix) and len(name) > len(prefix):
                return Candidate(name, route, name[len(prefix) :])
        return None

    def candidates(self, name: str) -> list[Candidate]:
        """The route for `name`, then its fallbacks in order, each once."""
        first = self.resolve(name)
        if first is None:
            return []
        chosen, seen = [first], {name}
        for fallback in first.route.fallbacks:
            if fallback in seen:
                continue
            seen.add(fallback)
            candidate = self.resolve(fallback)
            if candidate is not None:
                chosen.append(candidate)
        return chosen

    def prices_for(self, candidate: Candidate) -> tuple[PriceInfo, ...]:
        return self.prices.get(candidate.public_name) or self.prices.get(
            candidate.route.name, ()
        )

    def listed_models(self) -> list[RouteInfo]:
        """Concrete routes, for /v1/models (wildcards name no single model)."""
        return [route for name, route in sorted(self.routes.items())]


def load_catalog(generation: int) -> Catalog:
    providers = {
        p.pk: ProviderInfo(
            id=p.pk,
            name=p.name,
            base_url=p.base_url.rstrip("/"),
            api_key=resolve_provider_key(
                api_key_env=p.api_key_env, api_key_encrypted=p.api_key_encrypted
            ),
            timeout_s=p.timeout_s,
        )
        for p in Provider.objects.all()
    }
    routes: dict[str, RouteInfo] = {}
    wildcards: list[tuple[str, RouteInfo]] = []
    for route in ModelRoute.objects.filter(is_active=True):
        info = RouteInfo(
            name=route.name,
            provider=providers[route.provider_id],
            upstream_model=route.upstream_model or route.name,
            fallbacks=tuple(route.fallbacks or ()),
            max_output_tokens=route.max_output_tokens,
        )
        if route.is_wildcard:
            wildcards.append((route.name[:-1], info))
        else:
            routes[route.name] = info
    wildcards.sort(key=lambda item: len(item[0]), reverse=True)
    prices: dict[str, list[PriceInfo]] = {}
    for price in Price.objects.order_by("model", "-effective_from"):
        prices.setdefault(price.model, []).append(
            PriceInfo(
                id=price.pk,
                model=price.model,
                input=price.input,
                output=price.output,
                cached_input=price.cached_input,
                effective_from=price.effective_from,
            )
        )
    return Catalog(
        generation=generation,
        routes=routes,
        wildcards=tuple(wildcards),
        prices={model: tuple(rows) for model, rows in prices.items()},
    )
