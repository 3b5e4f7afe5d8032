"""Emulated llama.cpp and vLLM servers whose timing follows measured performance profiles."""
