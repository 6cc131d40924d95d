from .device_random_sampler import DeviceRandomSampler

__all__ = ['DeviceRandomSampler']
