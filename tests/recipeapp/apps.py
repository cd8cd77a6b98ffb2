from django.apps import AppConfig


class RecipeAppConfig(AppConfig):
    name = "tests.recipeapp"
    label = "recipeapp"
    default_auto_field = "django.db.models.BigAutoField"
