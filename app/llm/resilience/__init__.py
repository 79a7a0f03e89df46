"""Resilience around every LLM call: one retry loop, breakers, rate limits, bulkheads, fallbacks.

The order around each call is: rate limit -> total deadline -> retry ->
breaker -> per-attempt timeout. The SDKs' own retries are turned off beneath
the one retry loop here, so attempts never multiply.
"""
